"""benchmarks/profile_reference.py: a refbench harness runs in-process with its timing loop replaced
by one profiled training step, the reference imports its own top-level packages even where they
share a name with ours (IDF's ``models``), and missing folders are one-line errors.  A stand-in
harness and checkout are written here: no reference code needed."""
import json
import subprocess
import sys

from tests.helpers import ROOT

COMMON = '''
import argparse, os, sys
import torch
def get_args(name):
    p = argparse.ArgumentParser()
    for a, d in (("--ref-dir", None), ("--config", "small"), ("--batch", 16), ("--threads", 2), ("--seed", 0)):
        p.add_argument(a, default=d, type=type(d) if d is not None else str)
    a = p.parse_args()
    sys.path.insert(0, a.ref_dir)
    return a
def load_data():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    return x, x[:16]
def batches(x, bs, seed=0):
    while True:
        for i in range(0, len(x) - bs + 1, bs):
            yield x[i:i + bs]
def run(*args, **kwargs):
    raise SystemExit("the real timing loop must not run")
'''

HARNESS = '''
import torch
from _common import get_args, run
args = get_args("integer_discrete_flows")
from models.Model import Net   # the reference's own ``models``, not flowlab's
model = Net()
opt = torch.optim.Adam(model.parameters())
def train_step(x):
    loss = model(x.float() / 255).pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad()
    return loss.item()
run("stand-in IDF", args, model, train_step)
'''


def _fake_refs(tmp_path):
    bench, refs = tmp_path / "refbench", tmp_path / "refs"
    bench.mkdir()
    (bench / "_common.py").write_text(COMMON)
    (bench / "ref_idf.py").write_text(HARNESS)
    pkg = refs / "integer_discrete_flows" / "models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "Model.py").write_text("import torch\nclass Net(torch.nn.Sequential):\n"
                                  "    def __init__(self):\n        super().__init__(torch.nn.Conv2d(3, 8, 3, padding=1))\n")
    return bench, refs


def _run(*argv):
    return subprocess.run([sys.executable, "benchmarks/profile_reference.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_profiles_one_step_of_the_harness_model(tmp_path):
    bench, refs = _fake_refs(tmp_path)
    proc = _run("idf", "--refbench", str(bench), "--refs", str(refs), "--warmup", "1", "--top", "5",
                "--json", str(tmp_path / "p.json"))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["reference"] == "stand-in IDF" and out["batch"] == 16
    assert 0 < out["kernel_floor_seconds"] <= out["profiled_seconds"] and 0 < out["kernel_share"] <= 1
    assert any("convolution" in r["op"] for r in out["top"])
    assert json.loads((tmp_path / "p.json").read_text())["kernel_share"] == out["kernel_share"]
    assert "kernel floor" in proc.stdout


def test_missing_harness_or_checkout_is_one_line(tmp_path):
    bench, refs = _fake_refs(tmp_path)
    for argv, message in ((["--refbench", str(tmp_path / "none"), "--refs", str(refs)], "refbench harness not found"),
                          (["--refbench", str(bench), "--refs", str(tmp_path)], "reference checkout not found")):
        proc = _run("idf", *argv)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and lines[-1].startswith("error:") and message in lines[-1], proc.stderr
