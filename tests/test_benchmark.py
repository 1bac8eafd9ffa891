"""benchmarks/throughput.py runs end to end as a CLI and prints one well-formed JSON line; every benchmark
script run as a file imports the checkout it lives in."""
import json
import os
import re
import shutil
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


# ---- a benchmark script imports the checkout it lives in ----------------------------------------
# The venv's editable install maps the project's packages to one checkout; a script run as a file
# (``python benchmarks/x.py``) from another checkout (a ``git worktree`` for a before/after timing)
# would otherwise import that one, and an A/B would compare a checkout with itself.

PROJECT_PACKAGES = ("benchmarks", "common", "compression", "data", "engine", "models", "scripts")
BOOTSTRAP = "sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))"


def test_every_benchmark_script_puts_its_checkout_first_before_it_imports_the_project():
    project_import = re.compile(rf"^\s*(from|import) ({'|'.join(PROJECT_PACKAGES)})[. ]", re.M)
    scripts = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py") and f != "__init__.py")
    imports_project = []
    for name in scripts:
        with open(os.path.join(ROOT, "benchmarks", name)) as f:
            source = f.read()
        first = project_import.search(source)
        if first is None:
            continue  # (it only starts subprocesses of files under its own root)
        imports_project.append(name)
        at = source.find(BOOTSTRAP) if BOOTSTRAP in source else source.find("sys.path.insert(0, ROOT)")
        assert 0 <= at < first.start(), f"benchmarks/{name} imports the project before it puts its checkout first"
    assert "throughput.py" in imports_project and len(imports_project) >= 10, imports_project


def test_a_benchmark_run_as_a_file_imports_its_own_checkout(tmp_path):
    """A copy of the project's packages elsewhere, whose ``engine`` says where it was imported from:
    ``python <copy>/benchmarks/throughput.py --help`` must import the copy, not the installed checkout."""
    copy = tmp_path / "checkout"
    for pkg in PROJECT_PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), copy / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.npz"))
    with open(copy / "engine" / "__init__.py", "a") as f:
        f.write('\nprint("engine imported from", __file__)\n')
    proc = subprocess.run([sys.executable, str(copy / "benchmarks" / "throughput.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"engine imported from {copy / 'engine' / '__init__.py'}" in proc.stdout, proc.stdout[:500]
