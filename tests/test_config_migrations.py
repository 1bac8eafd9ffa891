"""Old run directories still load (engine/config_migrations.py): a config written with the
pre-Contract-v2 keys resolves to the current config, and the model built from it has exactly
the parameters (names and shapes) of the model built from the current config.

The old-style configs below are hard-coded copies of what the experiments' ``model`` sections
(and resolved run configs) looked like before the rename: ``model.depth``,
``model.dequantization``, ``model.dequant_*``, ``model.noise_*``, ``model.scales``, ...
"""
from __future__ import annotations

import os

import pytest
import torch

from engine.checkpoint import save_checkpoint
from engine.config import load_config, resolve
from engine.config_migrations import RENAMED, TO_DEQUANTIZER, upgrade
from common.errors import FlowlabError
from engine.run import load_run
from engine.setup import count_parameters, make_model
from models.architectures import ARCHITECTURES, architecture
from tests.helpers import ROOT

# (old model section, n_bits, the current config it must equal: experiments file + overrides, parameters)
OLD = {
    "glow_small": ({"name": "glow", "levels": 3, "depth": 4, "hidden_channels": 64, "coupling": "affine",
                    "permutation": "conv1x1", "learn_top": True}, 8, ("glow_small.yaml", []), 453_540),
    # a resolved old Glow section (every key) with the paper-size variational dequantizer
    "glow_variational": ({"name": "glow", "levels": 3, "depth": 4, "hidden_channels": 64, "coupling": "affine",
                          "permutation": "conv1x1", "learn_top": True, "edge_padding": True,
                          "dequantization": "variational"}, 8,
                         ("glow_small.yaml", ["dequantizer.kind=variational"]), 3_920_516),
    "glow_argmax": ({"name": "glow", "levels": 3, "depth": 4, "hidden_channels": 64, "dequantization": "argmax"}, 8,
                    ("glow_small.yaml", ["dequantizer.kind=argmax"]), 19_566_944),
    # every key of the old Flow++ section: the dequantizer shared heads, components, attention, dropout
    "flowpp_small": ({"name": "flowpp", "steps": [2, 2, 2], "filters": 32, "blocks": 1, "heads": 4, "components": 4,
                      "attention": True, "dropout": 0.0, "logit_alpha": 0.05, "dequantization": "variational",
                      "dequant_steps": 1, "dequant_filters": 32, "dequant_blocks": 1, "context_channels": 16,
                      "context_blocks": 1}, 8, ("flowpp_small.yaml", []), 524_796),
    "flowpp_uniform": ({"name": "flowpp", "steps": [2, 2, 2], "filters": 32, "blocks": 1, "heads": 4, "components": 4,
                        "attention": True, "dropout": 0.0, "logit_alpha": 0.05, "dequantization": "uniform",
                        "dequant_steps": 1, "dequant_filters": 32, "dequant_blocks": 1, "context_channels": 16,
                        "context_blocks": 1}, 8, ("flowpp_small.yaml", ["dequantizer.kind=uniform"]), 445_376),
    "flowpp_affine_paper": ({"name": "flowpp", "steps": [4, 2, 3], "filters": 108, "blocks": 10, "heads": 4,
                             "components": 0, "attention": True, "dropout": 0.2, "logit_alpha": 0.05,
                             "dequantization": "variational", "dequant_steps": 4, "dequant_filters": 108,
                             "dequant_blocks": 2, "context_channels": 32, "context_blocks": 3}, 8,
                            ("flowpp_cifar10_affine.yaml", []), 32_045_708),
    "argmax_small": ({"name": "argmax", "encoding": "binary", "levels": 3, "depth": 4, "hidden_channels": 64,
                      "noise_steps": 1, "noise_filters": 32, "noise_blocks": 1, "noise_components": 4, "noise_heads": 4,
                      "context_channels": 16, "context_blocks": 1}, 8, ("argmax_small.yaml", []), 8_938_672),
    "argmax_onehot": ({"name": "argmax", "encoding": "onehot", "levels": 3, "depth": 4, "hidden_channels": 64,
                       "coupling": "affine", "permutation": "conv1x1", "learn_top": True, "edge_padding": True,
                       "noise_steps": 1, "noise_filters": 32, "noise_blocks": 1, "noise_components": 4,
                       "noise_heads": 4, "noise_attention": True, "context_channels": 16, "context_blocks": 1,
                       "dropout": 0.0}, 2, ("argmax_cifar10_4levels_small.yaml", []), 2_955_832),
    "realnvp_small": ({"name": "realnvp", "scales": 2, "num_blocks": 1, "features": 16, "weight_norm": False,
                       "batch_norm": True, "bn_momentum": 0.05, "logit_alpha": 0.05, "factor_out_prior": "standard",
                       "dequantization": "uniform"}, 8, ("realnvp_small.yaml", []), 77_673),
    "ffjord_small": ({"name": "ffjord", "scales": 2, "blocks": 1, "hidden_dims": [32, 32], "layer_type": "concat",
                      "nonlinearity": "softplus", "zero_last": True, "logit_alpha": 0.05, "end_time": 1.0,
                      "train_end_time": False, "adjoint": False, "trace": "hutchinson", "trace_eval": "hutchinson",
                      "noise": "rademacher", "solver": "dopri5", "atol": 1e-3, "rtol": 1e-3, "test_solver": "dopri5",
                      "test_atol": 1e-4, "test_rtol": 1e-4, "kinetic_energy": 0.0, "jacobian_norm2": 0.0,
                      "dequantization": "uniform"}, 8, ("ffjord_small.yaml", []), 41_874),
    "resflow_small": ({"name": "resflow", "blocks": [2, 2, 2], "hidden_channels": 64, "fc_blocks": 2, "fc_hidden": 64,
                       "coeff": 0.98, "estimator": "roulette", "roulette_dist": "poisson", "n_exact_terms": 2,
                       "n_exact_terms_eval": 20, "neumann_grad": True, "mem_efficient": True,
                       "dequantization": "uniform"}, 8, ("resflow_small.yaml", []), 984_215),
    "idf_small": ({"name": "idf", "levels": 3, "flows_per_level": 4, "hidden_channels": 48, "densenet_depth": 4,
                   "coupling_split": "quarter", "permutation": "shuffle", "prior_mixtures": 5,
                   "split_prior_mixtures": 1}, 8, ("idf_small.yaml", []), 410_436),
}


def _meta_model(cfg):
    with torch.device("meta"):
        return make_model(cfg, (3, 32, 32), cfg["data"]["n_bits"])


def _shapes(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


BORN_IN_V2 = {"vector_flow", "flow_vae", "discrete_flow", "bnn"}  # families registered with the Contract v2 names: no old configs


def test_every_family_has_an_old_config_here():
    assert {old["name"] for old, *_ in OLD.values()} == set(ARCHITECTURES) - BORN_IN_V2


@pytest.mark.parametrize("name", sorted(OLD))
def test_old_config_resolves_to_the_current_one_and_builds_the_same_parameters(name):
    old_model, n_bits, (config, overrides), params = OLD[name]
    current = load_config(os.path.join(ROOT, "experiments", config), overrides)
    old = resolve({"model": old_model, "data": {"n_bits": n_bits}})
    assert old["model"] == current["model"] and old["dequantizer"] == current["dequantizer"]
    a, b = _meta_model(old), _meta_model(current)
    assert _shapes(a) == _shapes(b)
    assert count_parameters(a) == count_parameters(b) == params
    assert str(a) == str(b)  # same layers and settings (dropout, attention, ...), not only the same shapes


def test_resolve_is_idempotent_and_the_input_is_not_modified():
    old_model = dict(OLD["flowpp_small"][0])
    raw = {"model": old_model}
    cfg = resolve(raw)
    assert raw == {"model": OLD["flowpp_small"][0]}
    assert resolve(cfg) == cfg and upgrade(cfg) is cfg


def test_every_old_key_has_a_current_place():
    """Each mapping points at a key the family (or the dequantizer section) really has."""
    for family, renames in RENAMED.items():
        module = architecture(family)
        for old, new in renames.items():
            assert old not in module.DEFAULTS and new in module.DEFAULTS, (family, old, new)
    for family, moves in TO_DEQUANTIZER.items():
        deq = resolve({"model": {"name": family}})["dequantizer"]
        assert set(moves.values()) <= set(deq) and not set(moves) & set(architecture(family).DEFAULTS), family


def test_old_keys_in_a_new_config():
    # alone, an old key still works (it is moved to its current place) ...
    cfg = load_config(os.path.join(ROOT, "experiments", "quickstart.yaml"), ["model.dequantization=variational"])
    assert cfg["dequantizer"]["kind"] == "variational"
    assert resolve({"model": {"name": "glow", "depth": 2}})["model"]["steps"] == 2
    # ... given together with its new name it is a one-line error naming both
    for config, override, message in [
        ("glow_small.yaml", "model.depth=2", "model.depth (the old name) and model.steps"),
        ("flowpp_small.yaml", "model.dequantization=uniform", "model.dequantization (the old name) and dequantizer.kind"),
        ("argmax_small.yaml", "model.noise_steps=2", "model.noise_steps (the old name) and dequantizer.steps"),
    ]:
        with pytest.raises(FlowlabError, match=r"keep only") as e:
            load_config(os.path.join(ROOT, "experiments", config), [override])
        assert message in str(e.value) and "\n" not in str(e.value)


def test_an_old_run_directory_loads_and_resumes(tmp_path):
    """A checkpoint whose config has the old keys (and no dequantizer section) loads strictly,
    and resuming it with the current config is resuming the same run."""
    from engine.trainer import prepare_run_dir

    current = load_config(os.path.join(ROOT, "experiments", "glow_small.yaml"),
                          ["model.levels=2", "model.steps=1", "model.hidden_channels=8", "dequantizer.kind=variational"])
    old_cfg = {k: v for k, v in current.items() if k != "dequantizer"}  # what an old run directory carries
    old_cfg["model"] = {"name": "glow", "levels": 2, "depth": 1, "hidden_channels": 8, "coupling": "affine",
                        "permutation": "conv1x1", "learn_top": True, "edge_padding": True,
                        "dequantization": "variational"}
    model = make_model(current, (3, 8, 8), 8)
    run = tmp_path / "old_run"
    run.mkdir()
    save_checkpoint({"config": old_cfg, "model": model.state_dict(), "ema": None, "optimizer": {}, "step": 3,
                     "images_seen": 48, "data_shape": [3, 8, 8]}, str(run / "checkpoint.pt"))
    cfg, loaded, info = load_run(str(run))  # strict: the old config builds exactly these parameter names
    assert cfg.to_dict() == current and info["step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    state = prepare_run_dir(str(run), current, resume=True)
    assert state.config == current
