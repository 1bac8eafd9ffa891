"""Shared pytest fixtures.

* Every test starts from the same torch RNG state (``torch.manual_seed(0)``), so
  random inputs and random initialisations are reproducible test by test and do not
  depend on which tests ran before.
* ``float64`` (opt-in): makes float64 the default dtype for the test, so layers built
  inside it have float64 parameters and random tensors are float64; the previous
  default is restored afterwards.  Use it for invertibility and log-det checks,
  where float32 rounding would hide or fake small errors.
* ``one_thread`` (opt-in): torch on one thread for the test (restored afterwards); small
  models train many times faster so on a shared CPU than with threads fighting for cores.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield torch.float64
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
