"""Resumable evaluation, its stale-result check, per-image noise, the protocol and the paired table.

Runs are trained in process for two steps on a tiny generated npz data set (64 train / 37 test
images of 3x8x8: 37 is prime, so every chunk and process split has a remainder)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from engine.per_image import image_bpd
from tests.helpers import build_flow, random_images, resolve_overrides
from tests.test_contract import TINY

RUN_TINY = ["model.levels=2", "model.steps=1", "model.hidden_channels=8", "data.name=npz", "data.hflip=true",
            "train.batch_size=8", "train.init_batch_size=16", "train.eval_every=0", "train.sample_every=0",
            "train.checkpoint_every=0", "train.log_every=1", "eval.batch_size=8"]


def tiny_npz(path, n_train=64, n_test=37, seed=0) -> str:
    g = np.random.default_rng(seed)
    np.savez(path, x_train=g.integers(0, 256, (n_train, 8, 8, 3), dtype=np.uint8), y_train=np.zeros(n_train, np.int64),
             x_test=g.integers(0, 256, (n_test, 8, 8, 3), dtype=np.uint8), y_test=np.zeros(n_test, np.int64))
    return str(path)


def tiny_run(out, data_path, *overrides, resume=False) -> str:
    """A two-step glow run (in process, as users' train.py runs it) in ``out``."""
    from engine.config import load_config
    from engine.trainer import run_training

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "experiments", "glow_small.yaml"),
                      [*RUN_TINY, f"data.path={data_path}", "train.steps=2", *overrides])
    run_training(cfg, str(out), resume=resume)
    return str(out)


def evaluate(run, eval_dir, **kw):
    from eval import evaluate_run
    return evaluate_run(run, "test", None, "cpu", eval_dir=str(eval_dir), chunk_images=kw.pop("chunk_images", 8), **kw)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    data = tiny_npz(tmp / "x.npz")
    return tiny_run(tmp / "a", data), data, tmp


def test_noise_per_image_does_not_depend_on_the_batch(one_thread):
    cfg = resolve_overrides(["model.name=glow", *TINY["glow"]])  # uniform dequantization
    model = build_flow(cfg, (3, 8, 8)).eval()
    x = random_images(5, (3, 8, 8))
    whole, shared = image_bpd(model, x, torch.arange(5), 5, seed=3, device="cpu")
    pieces = torch.cat([image_bpd(model, x, torch.tensor(i), bs, seed=3, device="cpu")[0]
                        for i, bs in (([3, 4], 1), ([0, 1, 2], 2))])
    assert shared == 0
    assert torch.allclose(pieces, whole[[3, 4, 0, 1, 2]], atol=1e-5, rtol=0)
    other_seed, _ = image_bpd(model, x, torch.arange(5), 5, seed=4, device="cpu")
    assert (other_seed - whole).abs().min() > 0  # the seed does change every image's noise
    iw_a, _ = image_bpd(model, x, torch.arange(5), 8, seed=3, device="cpu", iw_samples=4, iw_chunk=4)
    iw_b, _ = image_bpd(model, x, torch.arange(5), 1, seed=3, device="cpu", iw_samples=4, iw_chunk=1)
    assert torch.allclose(iw_a, iw_b, atol=1e-5, rtol=0)  # sample k of image i: the same in any chunking


def test_per_image_noise_is_uniform_and_independent_across_rows():
    from engine.per_image import mix, noise_per_image

    with noise_per_image([mix(0, i) for i in range(64)], torch.device("cpu")):
        u = torch.rand(64, 4096)
        z = torch.randn_like(u)
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert abs(z.mean().item()) < 0.02 and abs(z.var().item() - 1) < 0.03
    assert (u.min(), u.max()) >= (torch.tensor(0.0), torch.tensor(0.0)) and u.max() < 1
    corr = torch.corrcoef(u[:8])
    assert (corr - torch.eye(8)).abs().max() < 0.1  # rows are separate streams
    with noise_per_image([mix(0, 5)], torch.device("cpu")):
        alone = torch.rand(1, 4096)
    assert torch.equal(alone[0], u[5])  # row 5's draw, whatever the batch around it


def test_an_interrupted_iw_evaluation_resumes_and_ends_with_the_same_number(run_a):
    run, _, tmp = run_a
    straight = evaluate(run, tmp / "straight", iw_samples=4, iw_chunk=2)
    part = evaluate(run, tmp / "resumed", iw_samples=4, iw_chunk=2, max_chunks=6)  # K=1: 5 chunks, IW: 1 of 5
    assert part["complete"] and part["iw"]["complete"] is False and part["iw"]["done"] == 8
    state = json.load(open(tmp / "resumed" / "test-iw-K4" / "state.json"))
    assert state["done"] == [[0, 8]] and state["complete"] is False
    kept = np.load(tmp / "resumed" / "test-iw-K4" / "per_image.npy")
    assert np.isfinite(kept[:8]).all() and np.isnan(kept[8:]).all()
    done = evaluate(run, tmp / "resumed", iw_samples=4, iw_chunk=2)
    assert done["chunks_run"] == 0 and done["iw"]["chunks_run"] == 4  # only the 29 images left
    assert done["iw"]["bpd"] == pytest.approx(straight["iw"]["bpd"], abs=1e-9)
    assert done["bpd"] == pytest.approx(straight["bpd"], abs=1e-9)
    assert np.allclose(np.load(done["iw"]["per_image"]), np.load(straight["iw"]["per_image"]), atol=1e-9, rtol=0)
    assert done["iw"]["bpd"] != done["bpd"]  # IW draws its own noise: a different number


def test_a_stale_result_of_another_checkpoint_is_not_reused(tmp_path, capsys):
    data = tiny_npz(tmp_path / "x.npz")
    run = tiny_run(tmp_path / "run", data)
    before = evaluate(run, tmp_path / "eval")
    tiny_run(tmp_path / "run", data, "train.steps=3", resume=True)  # the checkpoint moves on
    capsys.readouterr()
    after = evaluate(run, tmp_path / "eval")
    assert "not reused" in capsys.readouterr().out
    assert after["chunks_run"] == 5 and after["step"] == 3
    fresh = evaluate(run, tmp_path / "fresh")
    assert after["bpd"] == pytest.approx(fresh["bpd"], abs=1e-9) and after["bpd"] != before["bpd"]
    state = json.load(open(tmp_path / "eval" / "test-bound-K1" / "state.json"))
    assert state["identity"]["step"] == 3
    seeded = evaluate(run, tmp_path / "eval", seed=7)  # another noise seed is another evaluation too
    assert seeded["chunks_run"] == 5 and seeded["bpd"] != after["bpd"]


def test_protocol_and_the_paired_table(run_a):
    from eval import table

    run, data, tmp = run_a
    b = tiny_run(tmp / "b", data, "train.seed=1", "data.hflip=false", "train.lr=3e-3")
    ra, rb = evaluate(run, tmp / "ta", iw_samples=4), evaluate(b, tmp / "tb", iw_samples=4)
    rc = evaluate(b, tmp / "tc", max_examples=20)  # another test set (count): not paired
    p = ra["protocol"]
    assert p["data"]["count"] == 37 and p["data"]["split"] == "test" and p["data"]["version"].startswith("npz")
    assert len(p["data"]["sha256"]) == 64 and p["data"]["sha256"] == rb["protocol"]["data"]["sha256"]
    assert p["bound"]["name"] == "importance-weighted (K=4)" and p["bound"]["dequantizer"]["kind"] == "uniform"
    assert p["training"] == {"global_batch": 8, "processes": 1, "grad_accum_steps": 1, "micro_batch": 8,
                             "augmentations": ["hflip"], "steps": 2, "images_seen": 16, "epochs": 0.25}
    assert p["weights"]["ema"] is False and p["solver"] is None and p["eval_processes"] == 1
    assert rb["protocol"]["training"]["augmentations"] == []
    assert rc["protocol"]["data"]["sha256"] != p["data"]["sha256"]
    text = table([ra, rb, rc])
    header = text.splitlines()[0]
    for column in ("sha256", "version", "split (n)", "dequantizer", "solver", "EMA", "global batch", "processes", "augment"):
        assert column in header
    assert f"| npz | {p['data']['sha256'][:12]} |" in text and "| test (37) |" in text and "| 8 (1 x 1 x 8) |" in text
    paired = [line for line in text.splitlines() if line.startswith("| b | a |")]
    assert len(paired) == 1 and "IW K=4" in paired[0] and not any(line.startswith("| b | b |") for line in text.splitlines())
    diff = np.load(rb["iw"]["per_image"]) - np.load(ra["iw"]["per_image"])
    assert f"{diff.mean():+.4f} ± {diff.std(ddof=1) / math.sqrt(37):.4f}" in paired[0]
    assert diff.mean() == pytest.approx(rb["iw"]["bpd"] - ra["iw"]["bpd"], abs=1e-12)


def test_eval_defaults_to_the_runs_eval_max_examples(run_a, tmp_path):
    """eval.py scores the first eval.max_examples test images of a run that sets it (as the
    trainer's own evaluation does); --max-examples overrides it."""
    _, data, tmp = run_a
    run = tiny_run(tmp_path / "capped", data, "eval.max_examples=10")
    assert evaluate(run, tmp_path / "e1")["n"] == 10
    assert evaluate(run, tmp_path / "e2", max_examples=20)["n"] == 20
