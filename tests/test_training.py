"""End-to-end tests of the trainer and the CLIs, started the way users start them."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers import SUBSET, read_metric
from tests.helpers import run_command as run


TINY = [
    "model.levels=2", "model.steps=2", "model.hidden_channels=16",
    "data.name=npz", f"data.path={SUBSET}", "data.max_train=512", "data.max_test=128", "data.hflip=true",
    "train.batch_size=16", "train.init_batch_size=64", "train.log_every=1", "train.lr=2e-3",
    "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=0",
    "eval.batch_size=64", "sample.n=4", "sample.temperatures=[0.7]",
]


def train(out, *overrides, resume=False, check=True):
    args = [sys.executable, "train.py", "experiments/glow_small.yaml", "--out", str(out), *TINY, *overrides]
    return run(args + (["--resume"] if resume else []), check=check)


def test_training_lowers_test_bpd(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=40", "train.eval_every=40")
    test_bpd = read_metric(out, "test/bpd")
    assert set(test_bpd) == {0, 40}
    assert test_bpd[40] < test_bpd[0] - 0.3, test_bpd
    summary = json.load(open(out / "summary.json"))
    assert summary["images_seen"] == 40 * 16 and summary["world_size"] == 1
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tb"))


def test_resume_gives_the_same_next_losses(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, "train.steps=6")
    train(split, "train.steps=3", "train.checkpoint_every=3")
    train(split, "train.steps=6", resume=True)
    a, b = read_metric(straight, "train/bpd"), read_metric(split, "train/bpd")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a, b)
    sa, sb = json.load(open(straight / "summary.json")), json.load(open(split / "summary.json"))
    assert sb["images_seen"] == sa["images_seen"] == 6 * 16
    assert sb["param_checksums"][0] == pytest.approx(sa["param_checksums"][0], rel=1e-9)


def test_two_process_accelerate_launch_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp"
    args = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
            "train.py", "experiments/glow_small.yaml", "--out", str(out), *TINY, "train.steps=4", "train.eval_every=4"]
    run(args, env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    summary = json.load(open(out / "summary.json"))
    assert summary["world_size"] == 2, "accelerate launch did not start two processes"
    assert len(summary["param_checksums"]) == 2
    assert summary["param_checksums"][0] == summary["param_checksums"][1]
    assert summary["images_seen"] == 4 * 16
    assert read_metric(out, "test/bpd")  # evaluation gathered over both ranks


def test_two_process_gradient_accumulation_matches_one_process(tmp_path):
    """2 processes x 2 micro-batches of 4 = one process with the global batch of 16: IDF draws
    no noise and flips are off, so the gradient (its norm logged before clipping at 0.3) and
    the weights must agree, and the ranks stay identical (one all-reduce per optimizer step)."""
    common = ["experiments/idf_small.yaml", "model.levels=2", "model.steps=2", "model.hidden_channels=16",
              "model.hidden_blocks=2", "data.name=npz", f"data.path={SUBSET}", "data.max_train=256",
              "data.max_test=16", "data.hflip=false", "train.batch_size=16", "train.init_batch_size=32",
              "train.warmup_steps=0", "train.grad_clip=0.3", "train.steps=3", "train.log_every=1",
              "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "train.py", *common, "--out", str(one)])
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29534",
         "train.py", *common, "--out", str(two), "train.grad_accum_steps=2"],
        env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    s1, s2 = json.load(open(one / "summary.json")), json.load(open(two / "summary.json"))
    assert s2["world_size"] == 2 and s2["param_checksums"][0] == s2["param_checksums"][1]
    assert s2["images_seen"] == s1["images_seen"] == 3 * 16
    assert s2["param_checksums"][0] == pytest.approx(s1["param_checksums"][0], rel=1e-5)
    g1, g2 = read_metric(one, "train/grad_norm"), read_metric(two, "train/grad_norm")
    assert sorted(g2) == [1, 2, 3] and all(g2[k] == pytest.approx(g1[k], rel=1e-5) for k in g1)


def test_cli_round_trip_train_sample_eval(tmp_path):
    out = tmp_path / "rt"
    train(out, "train.steps=5", "train.ema=0.9", "train.sample_every=5")
    assert (out / "samples" / "step_0000005.png").is_file()
    grid = tmp_path / "grid.png"
    proc = run([sys.executable, "sample.py", str(out), "--n", "6", "--temperature", "0.5", "--temperature", "1.0", "--out", str(grid)])
    assert "non-finite pixels: 0" in proc.stdout
    from PIL import Image
    img = Image.open(grid)
    assert img.size == (6 * 34 + 2, 2 * 34 + 2)  # 6 columns x 2 temperature rows of 32px + 2px padding
    js = tmp_path / "eval.json"
    proc = run([sys.executable, "eval.py", str(out), "--json", str(js)])
    result = json.load(open(js))
    assert result["n"] == 128 and result["ema"] is True and 1.0 < result["bpd"] < 9.0
    assert f"{result['bpd']:.4f}" in proc.stdout
    proc = run([sys.executable, "eval.py", "--table", str(out), str(out)])
    assert proc.stdout.count("| rt | glow |") == 2


def test_config_errors_are_one_line(tmp_path):
    for override, message in [("train.foo=1", "unknown config key 'train.foo'"),
                              ("train.steps=abc", "config key 'train.steps' expects int"),
                              ("model.coupling=cubic", "must be one of"),
                              ("bogus=1", "must be section.key")]:
        proc = train(tmp_path / "x", override, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_missing_data_is_one_clear_error(tmp_path):
    proc = train(tmp_path / "x", "data.name=cifar10", f"data.root={tmp_path}/none", "data.download=false", check=False)
    assert proc.returncode == 2 and "CIFAR-10 not found" in proc.stderr and "data.path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2")
    ckpt = out / "checkpoint.pt"
    # an existing checkpoint is never overwritten by a new run without --resume
    proc = train(out, "train.steps=2", check=False)
    assert proc.returncode == 2 and "already holds a checkpoint" in proc.stderr
    # resuming with another architecture
    proc = train(out, "train.steps=4", "model.hidden_channels=8", resume=True, check=False)
    assert proc.returncode == 2 and "model config differs" in proc.stderr
    # a checkpoint whose weights do not match its config
    state = load_checkpoint(str(ckpt))
    state["config"]["model"]["hidden_channels"] = 8
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    save_checkpoint({k: v for k, v in state.items() if k != "format_version"}, str(mismatched / "checkpoint.pt"))
    proc = run([sys.executable, "eval.py", str(mismatched)], check=False)
    assert proc.returncode == 2 and "does not match the model" in proc.stderr, proc.stderr
    # a truncated checkpoint
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(ckpt.read_bytes()[:1000])
    for cmd in (["eval.py", str(corrupt)], ["sample.py", str(corrupt), "--out", str(tmp_path / "g.png")]):
        proc = run([sys.executable, *cmd], check=False)
        assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_persistent_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    train(out, "train.steps=2", "train.checkpoint_every=2")
    before = (out / "checkpoint.pt").read_bytes()
    # a learning rate this large drives the weights to non-finite values within a few steps
    proc = train(out, "train.steps=40", "train.lr=1e12", "train.max_nonfinite=3", "train.checkpoint_every=1",
                 resume=True, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "training stopped: 3 consecutive non-finite steps" in proc.stderr
    assert "first non-finite layer: transforms." in proc.stderr
    assert "step skipped" in proc.stdout
    after = load_checkpoint(str(out / "checkpoint.pt"))
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())
    assert after["step"] >= 2 and (after["step"] > 2 or (out / "checkpoint.pt").read_bytes() == before)


def test_time_limit_stops_early_with_a_final_checkpoint_and_eval(tmp_path):
    out = tmp_path / "timed"
    proc = train(out, "train.steps=100000", "train.time_limit_minutes=0.0001", "train.eval_every=100000")
    assert "time limit of 0.0001 min reached at step 1" in proc.stdout
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == 1 and state["images_seen"] == 16
    assert set(read_metric(out, "test/bpd")) == {0, 1}  # evaluated at the start and where it stopped
