"""Config files: ``base:`` inheritance (and the configs converted to it), ``data.path``
relative to the config file, ``train.py --print-config``."""
from __future__ import annotations

import os
import sys

import pytest
import yaml

from engine.config import load_config, load_yaml, resolve
from common.errors import FlowlabError
from tests.helpers import ROOT
from tests.helpers import run_command as run

EXPERIMENTS = os.path.join(ROOT, "experiments")
BEFORE_BASE = os.path.join(ROOT, "tests", "data", "configs_before_base")


# ---- base: inheritance -----------------------------------------------------------------------------

CONVERTED = {  # converted config -> the file it now names as its base
    "flowpp_cifar10_affine": "flowpp_cifar10.yaml", "flowpp_cifar10_no_attention": "flowpp_cifar10.yaml",
    "flowpp_cifar10_uniform_dequant": "flowpp_cifar10.yaml", "rnode_cifar10": "ffjord_cifar10.yaml",
    "iresnet_cifar10": "resflow_cifar10.yaml", "quickstart": "glow_small.yaml",
}


@pytest.mark.parametrize("name", sorted(CONVERTED))
def test_configs_converted_to_base_resolve_as_before(name):
    """tests/data/configs_before_base/ holds each file as it was before it named a base."""
    with open(os.path.join(BEFORE_BASE, f"{name}.yaml")) as f:
        before = resolve(yaml.safe_load(f))
    path = os.path.join(EXPERIMENTS, f"{name}.yaml")
    with open(path) as f:
        assert yaml.safe_load(f)["base"] == CONVERTED[name]
    assert load_config(path) == before


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_base_chains_merge_key_by_key(tmp_path):
    _write(tmp_path / "a.yaml", "model: {name: glow, levels: 2, hidden_channels: 16}\n"
                                "train: {steps: 10, lr: 1.0e-3}\nsample: {temperatures: [0.5, 1.0]}\n")
    _write(tmp_path / "sub" / "b.yaml", "base: ../a.yaml\nmodel: {levels: 3}\ntrain: {steps: 20}\neval:\n")
    c = _write(tmp_path / "sub" / "c.yaml", "base: b.yaml\ntrain: {lr: 5.0e-4}\nsample: {temperatures: [0.7]}\n")
    cfg = load_config(c)
    assert cfg["model"]["levels"] == 3 and cfg["model"]["hidden_channels"] == 16
    assert cfg["train"]["steps"] == 20 and cfg["train"]["lr"] == 5e-4
    assert cfg["sample"]["temperatures"] == [0.7]  # lists are values: replaced, not merged
    assert "base" not in load_yaml(c)
    assert load_config(c, ["train.steps=7"])["train"]["steps"] == 7  # overrides apply after the chain


def test_base_cycles_and_missing_bases_are_one_line_errors(tmp_path):
    x = _write(tmp_path / "x.yaml", "base: y.yaml\nmodel: {name: glow}\n")
    _write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(FlowlabError, match="cycle"):
        load_config(x)
    me = _write(tmp_path / "me.yaml", "base: me.yaml\nmodel: {name: glow}\n")
    with pytest.raises(FlowlabError, match="cycle"):
        load_config(me)
    lost = _write(tmp_path / "lost.yaml", "base: nowhere.yaml\nmodel: {name: glow}\n")
    with pytest.raises(FlowlabError, match="base file .*nowhere.yaml does not exist"):
        load_config(lost)
    proc = run([sys.executable, "train.py", x, "--print-config"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "cycle" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---- data.path relative to the config file ------------------------------------------------------

def test_data_path_is_relative_to_the_config_file_when_it_exists_there(tmp_path):
    (tmp_path / "cfgs" / "data").mkdir(parents=True)
    (tmp_path / "cfgs" / "data" / "x.npz").write_bytes(b"")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.npz").write_bytes(b"")
    _write(tmp_path / "shared" / "base.yaml", "model: {name: glow}\ndata: {name: npz, path: base.npz}\n")
    here = _write(tmp_path / "cfgs" / "here.yaml", "model: {name: glow}\ndata: {name: npz, path: data/x.npz}\n")
    cwd = _write(tmp_path / "cfgs" / "cwd.yaml", "model: {name: glow}\ndata: {name: npz, path: not/there.npz}\n")
    child = _write(tmp_path / "cfgs" / "child.yaml", "base: ../shared/base.yaml\n")
    assert load_config(here)["data"]["path"] == os.path.join(str(tmp_path), "cfgs", "data", "x.npz")
    assert load_config(cwd)["data"]["path"] == "not/there.npz"  # no such file beside the config: as given
    assert load_config(child)["data"]["path"] == os.path.join(str(tmp_path), "shared", "base.npz")  # the base's file
    assert load_config(here, ["data.path=data/x.npz"])["data"]["path"] == "data/x.npz"  # command line: the cwd's
    # the shipped small configs name no file: they resolve their CIFAR-10 at load time (data/default.py)
    assert load_config(os.path.join(EXPERIMENTS, "glow_small.yaml"))["data"]["path"] is None


# ---- --print-config ----------------------------------------------------------------------------------

def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path):
    config = os.path.join(EXPERIMENTS, "flowpp_cifar10_affine.yaml")
    out = tmp_path / "never"
    proc = run([sys.executable, "train.py", config, "--print-config", "--out", str(out), "train.steps=7"])
    printed = yaml.safe_load(proc.stdout)
    assert printed == load_config(config, ["train.steps=7"])
    assert printed["model"]["hidden_channels"] == 108 and printed["train"]["steps"] == 7 and "base" not in printed
    assert resolve(printed) == printed  # the output is itself a complete config
    assert not out.exists()


def test_an_unquoted_yaml_boolean_for_a_word_key_says_to_quote_it():
    """``train.mixed_precision=no`` reaches the config as False (YAML 1.1): one error line that says why."""
    with pytest.raises(FlowlabError, match=r"expects str, got False \(YAML reads unquoted no.*train.mixed_precision='no'\)"):
        load_config(os.path.join(EXPERIMENTS, "glow_small.yaml"), ["train.mixed_precision=no"])
    cfg = load_config(os.path.join(EXPERIMENTS, "glow_small.yaml"), ["train.mixed_precision='no'"])
    assert cfg["train"]["mixed_precision"] == "no"
