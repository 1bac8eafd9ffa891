"""benchmarks/reference_race.py: the overrides that give the references' small architectures build
models with the parameter counts the script records (so the match cannot drift silently), both
recipes resolve to what they say, and bad arguments are one-line errors.  No reference code needed."""
import os
import sys

import pytest
import torch

from benchmarks import reference_race as race
from common.errors import FlowlabError
from engine.config import load_config
from models.architectures import build_model
from tests.helpers import ROOT, meta_parameter_count

NPZ = "some/subset.npz"  # resolved, never read: the models are built on the meta device


def _config(family, recipe):
    fam = race.FAMILIES[family]
    overrides = [*race.common_overrides(family, NPZ, 120), *race.recipes(family)[recipe]]
    return load_config(os.path.join(ROOT, fam["config"]), overrides)


@pytest.mark.parametrize("family", sorted(race.FAMILIES))
@pytest.mark.parametrize("recipe", ["ref_recipe", "our_recipe"])
def test_our_model_has_the_recorded_parameter_count(family, recipe):
    cfg = _config(family, recipe)
    assert meta_parameter_count(cfg, (3, 32, 32)) == race.PARAMS[family]["ours"]
    assert cfg["train"]["batch_size"] == 64 and cfg["eval"]["max_examples"] == race.FAMILIES[family]["eval_n"]
    assert cfg["data"]["name"] == "npz" and cfg["data"]["path"] == NPZ
    assert cfg["train"]["time_limit_minutes"] == 2.0


@pytest.mark.parametrize("family", sorted(race.FAMILIES))
def test_the_reference_row_names_the_kind_of_number_ours_reports(family):
    cfg = _config(family, "our_recipe")
    with torch.device("meta"):
        model = build_model(cfg["model"], (3, 32, 32), cfg["data"]["n_bits"], cfg["dequantizer"])
    ours = {"bound": "single-sample (K=1)", "estimated": "estimated", "exact": "exact"}[model.likelihood_kind]
    assert race.FAMILIES[family]["ref_kind"] == ours
    assert ("logdet" in race.FAMILIES[family]) == (family in ("resflow", "ffjord"))


def test_every_difference_from_the_reference_is_explained():
    assert set(race.PARAMS) == set(race.FAMILIES)
    for family, p in race.PARAMS.items():
        assert (p["ours"] == p["reference"]) == (not p["why"]), family
    assert race.PARAMS["idf"]["ours"] == race.PARAMS["idf"]["reference"]
    assert race.PARAMS["ffjord"]["ours"] == race.PARAMS["ffjord"]["reference"]


@pytest.mark.parametrize("family", sorted(race.FAMILIES))
def test_the_reference_recipe_is_the_harness_optimizer(family):
    ref, ours = _config(family, "ref_recipe"), _config(family, "our_recipe")
    assert ref["train"]["warmup_steps"] == 0 and ref["data"]["hflip"] is False and ref["train"]["ema"] == 0
    assert ref["model"] != ours["model"] or ref["train"] != ours["train"]  # the two rows differ
    lr = {"glow": 1e-4}.get(family, 1e-3)
    assert ref["train"]["lr"] == lr
    assert ref["train"]["optimizer"] == ("adamax" if family == "idf" else "adam")


def test_table_rows():
    results = [("idf", "reference", {"params": 10, "train_steps": 3, "test_bpd": 7.1234, "test_n": 1017}, None),
               ("idf", "ref_recipe", {"num_params": 10, "step": 4, "bpd": 6.5, "stderr": 0.01, "n": 1017,
                                      "bound": "exact"}, None),
               ("idf", "our_recipe", None, "train.py exit 1")]
    lines = race.table(results, 120).splitlines()
    assert lines[0].startswith("| family | run | params | steps in 120 s")
    assert lines[2] == "| idf | reference | 10 | 3 | 7.123 | exact (1017) |"
    assert lines[3] == "| idf | ref recipe | 10 | 4 | 6.500 ± 0.010 | exact (1017) |"
    assert "failed: train.py exit 1" in lines[4]
    row = race.table([("ffjord", "reference", {"params": 1, "train_steps": 2, "test_bpd": 8.0, "test_n": 64}, None)], 5)
    assert row.splitlines()[2] == "| ffjord | reference | 1 | 2 | 8.000 | bound (single sample), Hutchinson log-det (64) |"


def test_missing_references_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "_common.py").write_text("")
    monkeypatch.delenv("REFS", raising=False)
    monkeypatch.setattr(sys, "argv", ["reference_race.py", "--refbench", str(tmp_path)])
    with pytest.raises(FlowlabError, match="--refs"):
        race.parse_args()
    monkeypatch.setattr(sys, "argv", ["reference_race.py", "--refbench", str(tmp_path), "--refs", str(tmp_path),
                                      "--families", "idf"])
    with pytest.raises(FlowlabError, match="integer_discrete_flows"):
        race.parse_args()
    monkeypatch.setattr(sys, "argv", ["reference_race.py", "--refbench", str(tmp_path / "none")])
    with pytest.raises(FlowlabError, match="no refbench harnesses"):
        race.parse_args()


def test_bf16_adds_both_recipes_in_bf16_and_nothing_else():
    plain, both = race.recipes("glow"), race.recipes("glow", bf16=True)
    assert set(both) == {*plain, "ref_recipe_bf16", "our_recipe_bf16"}
    for name, overrides in plain.items():
        assert both[name] == overrides and both[f"{name}_bf16"] == [*overrides, "train.mixed_precision=bf16"]
