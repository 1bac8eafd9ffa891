"""eval.py on two CPU processes (accelerate launch, as users start it) gives the single-process numbers."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.helpers import run_command
from tests.test_eval_protocol import evaluate, tiny_npz, tiny_run


def test_two_process_evaluation_equals_one_process(tmp_path):
    run = tiny_run(tmp_path / "run", tiny_npz(tmp_path / "x.npz"))  # 37 test images: odd, and not a multiple of 8
    one = evaluate(run, tmp_path / "one", iw_samples=4, iw_chunk=2)
    out = tmp_path / "two.json"
    run_command([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", "29547", "eval.py", run, "--iw-samples", "4", "--iw-chunk", "2",
                 "--chunk-images", "8", "--eval-dir", str(tmp_path / "two"), "--json", str(out)],
                env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    two = json.load(open(out))
    assert two["protocol"]["eval_processes"] == 2, "accelerate launch did not start two processes"
    assert json.load(open(tmp_path / "two" / "test-iw-K4" / "state.json"))["world_size"] == 2
    assert two["n"] == two["iw"]["n"] == 37
    for a, b in ((one, two), (one["iw"], two["iw"])):
        pa, pb = np.load(a["per_image"]), np.load(b["per_image"])
        assert np.isfinite(pb).all() and np.allclose(pa, pb, atol=1e-6, rtol=0)  # each image scored once, in place
        assert b["bpd"] == pytest.approx(a["bpd"], abs=1e-7) and b["stderr"] == pytest.approx(a["stderr"], rel=1e-5)
    assert two["protocol"]["data"]["sha256"] == one["protocol"]["data"]["sha256"]
