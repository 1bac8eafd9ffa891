"""benchmarks/side_by_side.py: ratios are taken against the reference of the same round and family,
medians over rounds; failed runs show their error; every family's runs name a reference harness;
bad arguments are one-line errors.  No reference code needed."""
import sys

import pytest

from benchmarks import side_by_side as sbs
from benchmarks.reference_race import FAMILIES
from tests.helpers import ROOT, run_command


def _row(round_, who, img, sample, mode="-", family="glow"):
    return {"round": round_, "family": family, "batch": 16, "who": who, "config": "paper config", "mode": mode,
            "img_per_s": img, "sample_s": sample, "peak_mb": 1000.0 + img}


def test_ratios_are_per_round_medians():
    rows = [_row(1, "reference", 2.0, 4.0), _row(1, "flowlab", 3.0, 2.0, "fp32"),
            _row(2, "reference", 4.0, 8.0), _row(2, "flowlab", 4.0, 2.0, "fp32"),
            _row(3, "reference", 1.0, 1.0), _row(3, "flowlab", 2.0, 1.0, "fp32")]
    lines = sbs.table(rows).splitlines()
    ours = next(line for line in lines if "| flowlab |" in line).split("|")
    # training: 1.5, 1.0, 2.0 -> 1.50x; sampling (reference / ours): 2, 4, 1 -> 2.00x; medians, not ratios of medians
    assert ours[8].strip() == "1.50x" and ours[10].strip() == "2.00x" and ours[6].strip() == "3"


def test_a_failed_run_shows_its_error():
    rows = [_row(1, "reference", 2.0, 4.0), {**_row(1, "flowlab", 0, 0, "bf16"), "failed": "throughput.py exit 1 (log: x)"}]
    assert "failed: throughput.py exit 1" in sbs.table(rows)


def test_every_family_runs_a_known_harness_and_modes_are_overrides():
    assert set(sbs.RUNS) <= set(FAMILIES)
    assert sbs.MODES["fp32"] == [] and all(o.startswith("train.") for m in sbs.MODES.values() for o in m)


@pytest.mark.parametrize("argv, message", [(["--refs", "/no/such/refs"], "--refs"),
                                           (["--refs", ROOT, "--refbench", ROOT], "no refbench harnesses")])
def test_bad_arguments_are_one_line_errors(argv, message):
    proc = run_command([sys.executable, "benchmarks/side_by_side.py", *argv], check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
