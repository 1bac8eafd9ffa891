"""benchmarks/profile_reference.py: a refbench harness runs in-process with its timing loop replaced
by one profiled training step, the reference imports its own top-level packages even where they
share a name with ours (IDF's ``models``), and missing folders are one-line errors.  A stand-in
harness and checkout (``tests/fake_refbench.py``): no reference code needed."""
import json
import subprocess
import sys

from tests.fake_refbench import write_fake_refbench
from tests.helpers import ROOT


def _run(*argv):
    return subprocess.run([sys.executable, "benchmarks/profile_reference.py", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_profiles_one_step_of_the_harness_model(tmp_path):
    bench, refs = write_fake_refbench(tmp_path)
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
    bench, refs = write_fake_refbench(tmp_path)
    for argv, message in ((["--refbench", str(tmp_path / "none"), "--refs", str(refs)], "refbench harness not found"),
                          (["--refbench", str(bench), "--refs", str(tmp_path)], "reference checkout not found")):
        proc = _run("idf", *argv)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0 and lines[-1].startswith("error:") and message in lines[-1], proc.stderr
