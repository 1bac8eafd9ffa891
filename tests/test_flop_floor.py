"""benchmarks/flop_floor.py: FLOPs counted as the formula gives them, a GEMM rate, and the CLI's
table and bounds for ours and a reference (the stand-in harness of ``tests/fake_refbench.py``)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks.flop_floor import count_flops, floors, gemm_rate
from tests.fake_refbench import CONV_FLOPS_PER_IMAGE, write_fake_refbench
from tests.helpers import ROOT, SUBSET


def test_counts_a_convolution_forward_and_backward_and_a_product():
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, requires_grad=True)
    forward = 4 * CONV_FLOPS_PER_IMAGE
    assert count_flops(lambda: F.conv2d(x, w, padding=1)) == forward
    # backward: one pass for the input's gradient, one for the weight's
    assert count_flops(lambda: F.conv2d(x, w, padding=1).sum().backward()) == 3 * forward
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    assert count_flops(lambda: (a @ b, torch.relu(a))) == 2 * 5 * 7 * 3  # elementwise work is free


def test_gemm_rate_and_floors():
    rate = gemm_rate(torch.float32, torch.device("cpu"), repeats=1, rounds=1)
    assert 1e8 < rate < 1e14
    out = floors({"step_flops": 10 ** 9, "step_seconds": 2.0}, 1e9)
    assert out["step_floor_seconds"] == 1.0 and out["step_over_floor"] == 2.0 and "sample_floor_seconds" not in out


def _run(*argv):
    return subprocess.run([sys.executable, "benchmarks/flop_floor.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "1"})


TINY = ["experiments/glow_small.yaml", "model.levels=2", "model.steps=1", "model.hidden_channels=8",
        "train.batch_size=4", "train.init_batch_size=4", "data.name=npz", f"data.path={SUBSET}"]


def test_ours_against_a_reference_end_to_end(tmp_path):
    bench, refs = write_fake_refbench(tmp_path)
    proc = _run(*TINY, "--warmup", "1", "--steps", "1", "--sample-n", "2", "--sample-runs", "1",
                "--reference", "idf", "--refbench", str(bench), "--refs", str(refs), "--json", str(tmp_path / "f.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, ref = out["ours"], out["reference"]
    assert out["batch"] == 4 and out["sample_n"] == 2 and out["dtype"] == "float32"
    # the stand-in's step: its convolution forward and weight gradient on a batch of 4 (the data needs none)
    assert ref["name"] == "stand-in IDF" and ref["step_flops"] == 2 * 4 * CONV_FLOPS_PER_IMAGE
    assert ref["sample_flops"] == 2 * CONV_FLOPS_PER_IMAGE
    assert ours["step_flops"] > ours["sample_flops"] > 0
    for side in (ours, ref):
        assert side["step_floor_seconds"] == pytest.approx(side["step_flops"] / out["gemm_flops_per_s"])
        assert side["step_over_floor"] > 1  # nothing runs faster than the GEMM rate
    assert out["train_ratio_bound"] == pytest.approx(ref["step_seconds"] / ours["step_floor_seconds"])
    assert out["train_ratio_bound"] > out["train_ratio_measured"]
    assert json.loads((tmp_path / "f.json").read_text())["train_ratio_bound"] == out["train_ratio_bound"]
    assert "no implementation of this architecture can exceed" in proc.stdout


def test_bad_arguments_are_one_line(tmp_path):
    for argv, message in ((["--steps", "0"], "--steps"), (["--reference", "idf"], "--reference needs --refbench"),
                          (["--json", str(tmp_path / "none" / "f.json")], "does not exist")):
        proc = _run(*TINY, *argv)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and lines[-1].startswith("error:") and message in lines[-1], proc.stderr
