"""The building blocks shared by the family builders (models/builders/) and the rules of the
``dequantizer:`` section: every continuous family takes uniform, variational and argmax (Glow
and argmax: Glow's levels; Flow++, RealNVP, FFJORD, Residual Flows: logit after uniform and
variational, none after argmax), a discrete family none; no family imports another."""
from __future__ import annotations

import ast
import glob
import os

import pytest
import torch

from engine.config import load_config, resolve
from common.errors import FlowlabError
from models.architectures import ARCHITECTURES, architecture, build_model
from models.builders import dequantizer
from models.builders.stack import LayerStack
from models.transforms.bijections.elementwise import Logit
from models.transforms.bijections.squeeze import Squeeze
from models.transforms.surjections.argmax import ArgmaxSurjection
from models.transforms.surjections.uniform_dequantization import UniformDequantization
from models.transforms.surjections.variational_dequantization import VariationalDequantization
from tests.helpers import ROOT

TINY_DEQ = {"steps": 1, "hidden_channels": 8, "hidden_blocks": 1, "components": 3, "heads": 2, "context_channels": 4,
            "context_blocks": 1}
FIRST = {"uniform": UniformDequantization, "variational": VariationalDequantization, "argmax": ArgmaxSurjection}


def test_layer_stack_tracks_the_shape():
    stack = LayerStack((3, 8, 8))
    assert stack.add(Squeeze()) is stack and stack.shape == (12, 4, 4)
    stack.add(Logit(0.05), Squeeze())
    assert stack.shape == (48, 2, 2) and len(stack) == 3 and isinstance(stack.transforms[1], Logit)


def test_family_builders_import_no_other_family():
    allowed = ("models.builders", "models.core", "models.nets", "models.transforms", "models.vae", "models.bayes")
    for path in glob.glob(os.path.join(ROOT, "models", "architectures", "*.py")):
        if path.endswith("__init__.py"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith("models"):
                    assert name.startswith(allowed), f"{os.path.basename(path)} imports {name}"


def test_every_family_states_its_dequantizers():
    none = {"idf", "discrete_flow", "vector_flow", "flow_vae", "bnn"}  # discrete images; vectors; a VAE on binary images; a classifier
    for name in ARCHITECTURES:
        kinds = architecture(name).DEQUANTIZERS
        expected = {"none"} if name in none else {"argmax": {"argmax"}}.get(name, set(dequantizer.KINDS))
        assert set(kinds) == expected, name
        cfg = resolve({"model": {"name": name}})
        assert cfg["dequantizer"]["kind"] == kinds[0]
        assert set(cfg["dequantizer"]) == ({"kind"} if name in none else set(dequantizer.DEFAULTS))
    assert [architecture(n).DEQUANTIZERS[0] for n in ("glow", "flowpp", "argmax")] == ["uniform", "variational", "argmax"]


@pytest.mark.parametrize("raw,message", [
    ({"model": {"name": "idf"}, "dequantizer": {"kind": "uniform"}}, "model 'idf' takes no dequantizer"),
    ({"model": {"name": "idf"}, "dequantizer": {"steps": 2}}, "unknown config key 'dequantizer.steps'"),
    ({"model": {"name": "glow"}, "dequantizer": {"kind": "none"}}, "supports dequantizer.kind uniform | variational"),
    ({"model": {"name": "argmax"}, "dequantizer": {"kind": "uniform"}}, "supports dequantizer.kind argmax, got"),
    ({"model": {"name": "realnvp"}, "dequantizer": {"kind": "learned"}}, "supports dequantizer.kind"),
    ({"model": {"name": "flowpp"}, "dequantizer": {"encoding": "gray"}}, "'dequantizer.encoding' must be one of"),
    ({"model": {"name": "glow"}, "dequantizer": {"filters": 8}}, "unknown config key 'dequantizer.filters'"),
])
def test_dequantizer_config_errors_are_one_line(raw, message):
    with pytest.raises(FlowlabError) as e:
        resolve(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_discrete_family_takes_an_absent_or_none_dequantizer():
    for raw in ({"model": {"name": "idf"}}, {"model": {"name": "idf"}, "dequantizer": {"kind": "none"}},
                {"model": {"name": "idf"}, "dequantizer": None}):
        assert resolve(raw)["dequantizer"] == {"kind": "none"}
    with pytest.raises(ValueError, match="supports dequantizer.kind none"):
        build_model({"name": "idf", **architecture("idf").DEFAULTS}, (3, 8, 8), 8, {"kind": "uniform"})


def test_family_defaults_of_the_dequantizer():
    """The paper's q (Flow++ settings) by default; Flow++ keeps its dropout 0.2 there, argmax a small q."""
    glow, flowpp, argmax = (resolve({"model": {"name": n}})["dequantizer"] for n in ("glow", "flowpp", "argmax"))
    assert glow == {**dequantizer.DEFAULTS, "kind": "uniform"}
    assert flowpp == {**dequantizer.DEFAULTS, "kind": "variational", "dropout": 0.2}
    assert (argmax["steps"], argmax["hidden_channels"], argmax["hidden_blocks"], argmax["components"]) == (2, 64, 1, 8)


def _tiny(name):
    model = {"ffjord": {"levels": 2, "steps": 1, "hidden_channels": [4], "solver": "rk4", "step_size": 0.5,
                        "test_solver": "rk4", "test_step_size": 0.5, "adjoint": False},
             "resflow": {"steps": [1, 1], "hidden_channels": 8, "fc_steps": 1, "fc_hidden_channels": 8},
             "realnvp": {"levels": 2, "hidden_blocks": 1, "hidden_channels": 8, "weight_norm": False}}[name]
    return {"name": name, **architecture(name).DEFAULTS, **model}


@pytest.mark.parametrize("kind", ["uniform", "variational", "argmax"])
@pytest.mark.parametrize("name", ["realnvp", "ffjord", "resflow"])
def test_logit_families_take_every_continuous_dequantizer(name, kind):
    """Logit pre-processing after uniform / variational (data in [0, 1)), none after argmax."""
    num_bits, shape = 2, (3, 4, 4)  # argmax: K = 4 categories, binary code of 2 dims -> 6 channels
    model = build_model(_tiny(name), shape, num_bits, {**TINY_DEQ, "kind": kind})
    assert isinstance(model.transforms[0], FIRST[kind])
    assert isinstance(model.transforms[1], Logit) == (kind != "argmax")
    assert not any(isinstance(t, Logit) for t in model.transforms[2:])
    x = torch.randint(0, 2 ** num_bits, (4, *shape)).float()
    model.data_init(x)
    logp = model.log_prob(x)
    assert logp.shape == (4,) and torch.isfinite(logp).all()
    if kind != "uniform":
        assert model.is_stochastic


def test_paper_configs_say_their_dequantizer():
    for config, kind in [("glow_cifar10.yaml", "uniform"), ("flowpp_cifar10.yaml", "variational"),
                         ("flowpp_cifar10_uniform_dequant.yaml", "uniform"), ("argmax_cifar10.yaml", "argmax"),
                         ("realnvp_cifar10.yaml", "uniform"), ("ffjord_cifar10.yaml", "uniform"),
                         ("resflow_cifar10.yaml", "uniform"), ("idf_cifar10.yaml", "none")]:
        assert load_config(os.path.join(ROOT, "experiments", config))["dequantizer"]["kind"] == kind, config
