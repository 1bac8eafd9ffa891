"""Shared pytest fixtures and options.

* Every test starts from the same torch RNG state (``torch.manual_seed(0)``), so
  random inputs and random initialisations are reproducible test by test and do not
  depend on which tests ran before.
* ``float64`` (opt-in): makes float64 the default dtype for the test, so layers built
  inside it have float64 parameters and random tensors are float64; the previous
  default is restored afterwards.  Use it for invertibility and log-det checks,
  where float32 rounding would hide or fake small errors.
* ``--device`` (``pytest --device cuda``; default ``cpu``) and the ``device`` fixture:
  the device the contract tests (``tests/test_contract.py``) put their models and
  inputs on, so the same suite runs on a GPU.  A device that this machine does not
  have is a usage error at start (exit status 4), never a silent run on the CPU.
  On CUDA the session uses deterministic kernels (cuDNN's, and
  ``torch.use_deterministic_algorithms`` with warnings for ops that have none): the
  contract checks that a seed reproduces ``log_prob`` exactly.
* ``one_thread`` (opt-in): torch on one thread for the test (restored afterwards); small
  models train many times faster so on a shared CPU than with threads fighting for cores.
* Under pytest-xdist (``make test`` runs ``pytest -n auto``) every worker gets
  cores // workers torch threads, and so do the commands its tests start.
"""
from __future__ import annotations

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", metavar="DEVICE",
                     help="torch device for the contract tests' models and inputs: cpu (default), cuda, cuda:N, mps")


def _requested_device(config) -> torch.device:
    name = config.getoption("--device")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise pytest.UsageError(f"--device {name}: not a torch device ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
                f"torch.cuda.is_available() is False); refusing to run the suite on the CPU instead")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise pytest.UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise pytest.UsageError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise pytest.UsageError(f"--device {name}: only cpu, cuda[:N] and mps are supported")
    return device


def pytest_configure(config):
    config._flowlab_device = _requested_device(config)  # fails at start, before any collection
    _share_cores_between_workers()
    if config._flowlab_device.type == "cuda":  # deterministic cuBLAS needs this before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _share_cores_between_workers() -> None:
    """Under pytest-xdist (``pytest -n N``) each worker gets cores // N torch threads, and the
    commands its tests start get the same through OMP_NUM_THREADS (unless a test sets it):
    N workers with a thread per core each would oversubscribe the machine N times."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_report_header(config):
    device = config._flowlab_device
    extra = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"flowlab contract tests on device: {device}{extra}"


@pytest.fixture(scope="session")
def device(pytestconfig) -> torch.device:
    device = pytestconfig._flowlab_device
    if device.type != "cuda":
        yield device
        return
    previous = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield device
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[:2]
        torch.use_deterministic_algorithms(previous[2], warn_only=previous[3])


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
