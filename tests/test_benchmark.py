"""benchmarks/throughput.py runs end to end as a CLI and prints one well-formed JSON line."""
import json
import os
import subprocess
import sys

from engine.config import load_config
from engine.setup import count_parameters, make_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("benchmarks", "throughput.py")
KEYS = {"config", "model", "device", "torch_threads", "batch_size", "params", "data", "train_img_per_s",
        "sec_per_step", "sample_seconds", "peak_memory_mb", "memory_kind", "mixed_precision"}


def run_benchmark(*args: str) -> dict:
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_glow_small_throughput_json():
    config, overrides = "experiments/glow_small.yaml", ["train.batch_size=4"]
    out = run_benchmark(config, *overrides, "--steps", "2", "--warmup", "1", "--sample-n", "2")
    assert KEYS <= set(out), KEYS - set(out)
    cfg = load_config(os.path.join(ROOT, config), overrides)
    assert out["params"] == count_parameters(make_model(cfg, (3, 32, 32), cfg["data"]["n_bits"]))
    assert out["model"] == "glow" and out["device"] == "cpu" and out["batch_size"] == 4
    assert out["data"] in ("real", "random") and out["mixed_precision"] == "no"
    assert out["train_img_per_s"] > 0 and out["sec_per_step"] > 0 and out["sample_seconds"] > 0
    assert out["peak_memory_mb"] > 0 and out["memory_kind"] == "cpu_peak_rss_process"


def test_falls_back_to_random_images_and_runs_bf16():
    tiny = ["model.levels=2", "model.steps=1", "model.hidden_channels=8", "train.batch_size=2",
            "data.name=npz", "data.path=does/not/exist.npz", "train.mixed_precision=bf16"]
    out = run_benchmark("experiments/glow_small.yaml", *tiny, "--steps", "1", "--warmup", "0", "--sample-n", "1")
    assert out["data"] == "random" and "(3, 32, 32)" in out["data_source"]
    assert out["mixed_precision"] == "bf16" and out["train_img_per_s"] > 0
