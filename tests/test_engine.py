"""The engine's own contracts: typed configs, the objective, the checkpoint's and the EMA's
formats, gradient accumulation (in-process, small)."""
from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import torch
from torch import nn

from engine.checkpoint import TrainingState, checkpoint_path, load_checkpoint
from engine.config import DEFAULTS, load_config, resolve
from engine.ema import EMA
from common.errors import FlowlabError
from engine.metrics import bits_per_dim
from engine.objectives import OBJECTIVES, BitsPerDim
from engine.run import load_run
from engine.sections import TYPED_SECTIONS, RunConfig
from engine.setup import make_model, make_objective, make_optimizer
from tests.helpers import ROOT, SUBSET

EXPERIMENTS = os.path.join(ROOT, "experiments")


# ---- typed configs -------------------------------------------------------------------------------

def test_typed_sections_are_generated_from_the_defaults():
    for name, view in TYPED_SECTIONS.items():
        fields = dataclasses.fields(view)
        assert [f.name for f in fields] == list(DEFAULTS[name])
        for f in fields:
            default = DEFAULTS[name][f.name]
            assert f.default == (tuple(default) if isinstance(default, list) else default), (name, f.name)
    cfg = RunConfig.from_resolved(load_config(os.path.join(EXPERIMENTS, "glow_small.yaml")))
    assert cfg.train.batch_size == 32 and cfg.train.grad_accum_steps == 1 and cfg.data.hflip is True
    assert cfg.train.betas == (0.9, 0.999) and cfg.model["name"] == "glow" and cfg.objective == {"name": "bpd"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.batch_size = 8


def test_run_config_round_trips_every_experiment():
    for path in sorted(glob.glob(os.path.join(EXPERIMENTS, "*.yaml"))):
        d = load_config(path)
        assert RunConfig.from_resolved(d).to_dict() == d, path
        assert resolve(d) == d, path  # a resolved config resolves to itself


def test_an_extra_top_level_section_passes_through():
    d = load_config(os.path.join(EXPERIMENTS, "glow_small.yaml"))
    d["dequantizer"] = {"kind": "uniform", "steps": 4}  # a section resolve() may add later
    cfg = RunConfig.from_resolved(d)
    assert cfg.extra == {"dequantizer": {"kind": "uniform", "steps": 4}} and cfg.dequantizer["steps"] == 4
    assert cfg.to_dict() == d and cfg.raw == d
    with pytest.raises(AttributeError):
        cfg.nonexistent_section
    assert cfg.run_difference(cfg) is None
    other = RunConfig.from_resolved({**d, "dequantizer": {"kind": "uniform", "steps": 2}})
    assert cfg.run_difference(other) == "dequantizer"


def test_objective_section_is_checked_like_model_keys():
    glow = {"model": {"name": "glow"}}
    assert resolve(glow)["objective"] == {"name": "bpd"}
    assert resolve({**glow, "objective": {"name": "bpd"}})["objective"] == {"name": "bpd"}
    with pytest.raises(FlowlabError, match="unknown objective.name 'hinge'; known: bnn, bpd, distill, elbo, nll, reverse_kl"):
        resolve({**glow, "objective": {"name": "hinge"}})
    with pytest.raises(FlowlabError, match="unknown config key 'objective.beta'"):
        resolve({**glow, "objective": {"beta": 1.0}})
    assert resolve({**glow, "objective": {"name": "elbo"}})["objective"] == {"name": "elbo", "anneal_steps": 10000}
    with pytest.raises(FlowlabError, match="'objective.energy' must be one of"):
        resolve({**glow, "objective": {"name": "reverse_kl", "energy": "u9"}})
    assert OBJECTIVES["bpd"] is BitsPerDim
    assert isinstance(make_objective(resolve(glow)), BitsPerDim)


# ---- the objective ---------------------------------------------------------------------------------

class _FakeFlow(nn.Module):
    """log p(x) = -w·sum(x^2) per example and two layers' auxiliary losses, like Flow.forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, return_aux=False):
        log_prob = -self.w * x.flatten(1).pow(2).sum(1)
        aux = {"transforms.1.kinetic_energy": self.w * 0.1, "transforms.4.kinetic_energy": self.w * 0.2,
               "transforms.2.jacobian_norm2": self.w * 0.3}
        return (log_prob, aux) if return_aux else log_prob


def test_bits_per_dim_objective_is_mean_bpd_plus_the_auxiliary_losses():
    model, x = _FakeFlow(), torch.randn(5, 2, 3, 3)
    loss, logs = BitsPerDim()(model, x)
    bpd = bits_per_dim(model(x), 18).mean()
    assert loss.item() == pytest.approx(bpd.item() + 0.5 * 0.6, rel=1e-6)
    assert set(logs) == {"bpd", "aux/kinetic_energy", "aux/jacobian_norm2"}
    assert logs["bpd"].item() == pytest.approx(bpd.item()) and not logs["bpd"].requires_grad
    assert logs["aux/kinetic_energy"].item() == pytest.approx(0.5 * 0.3)
    loss.backward()
    assert model.w.grad is not None


# ---- checkpoints and EMA -----------------------------------------------------------------------------

def _tiny_glow():
    cfg = load_config(os.path.join(EXPERIMENTS, "glow_small.yaml"),
                      ["model.levels=2", "model.steps=1", "model.hidden_channels=8", "train.ema=0.9"])
    model = make_model(cfg, (3, 8, 8), 8)
    model.data_init(torch.randint(0, 256, (8, 3, 8, 8)))
    return cfg, model


def test_checkpoints_in_the_format_1_layout_load_through_the_new_api(tmp_path):
    cfg, model = _tiny_glow()
    optimizer = make_optimizer(cfg, model.parameters())
    model(torch.randint(0, 256, (4, 3, 8, 8))).mean().neg().backward()
    optimizer.step()
    ema = EMA(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    ema.update(model)
    old_config = {k: dict(v) for k, v in cfg.items() if k != "objective"}  # as written before these keys existed
    del old_config["train"]["grad_accum_steps"]
    # the dict the trainer wrote before TrainingState existed (format version 1), by hand
    old = {
        "format_version": 1,
        "config": old_config,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "ema": {"decay": ema.decay, "shadow": {k: v.cpu() for k, v in ema.shadow.items()}},
        "optimizer": optimizer.state_dict(),
        "step": 7, "images_seen": 112, "nonfinite_total": 1, "world_size": 2,
        "data_shape": [3, 8, 8], "num_params": sum(p.numel() for p in model.parameters()),
    }
    torch.save(old, checkpoint_path(str(tmp_path)))

    state = TrainingState.load(checkpoint_path(str(tmp_path)))
    assert (state.step, state.images_seen, state.nonfinite_total, state.world_size) == (7, 112, 1, 2)
    assert state.data_shape == (3, 8, 8) and state.config == cfg  # filled in: objective, grad_accum_steps
    _, fresh = _tiny_glow()
    fresh_opt, fresh_ema = make_optimizer(cfg, fresh.parameters()), EMA(fresh, 0.5)
    state.restore(model=fresh, optimizer=fresh_opt, ema=fresh_ema)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
        assert torch.equal(fresh_ema.shadow[k], ema.shadow[k]), k
    assert fresh_ema.decay == 0.9
    saved = optimizer.state_dict()["state"]
    for i, s in fresh_opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], saved[i]["exp_avg"])

    # written back by the new code: format 2 (safetensors + JSON), the same fields and more
    again = tmp_path / "again"
    again.mkdir()
    TrainingState.capture(state.config, fresh, fresh_opt, fresh_ema, step=7, images_seen=112, nonfinite_total=1,
                          world_size=2, data_shape=(3, 8, 8)).save(checkpoint_path(str(again)))
    new = load_checkpoint(checkpoint_path(str(again)))
    assert set(new) >= set(old) and new["format_version"] == 2 and new["data_shape"] == [3, 8, 8]
    assert new["ema"]["decay"] == 0.9 and set(new["ema"]["shadow"]) == set(old["ema"]["shadow"])
    assert new["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]  # tuples, int keys kept
    assert set(new["optimizer"]["state"]) == set(optimizer.state_dict()["state"])

    # load_run: the EMA weights by default, the raw ones on request
    run_cfg, loaded, info = load_run(str(tmp_path))
    assert isinstance(run_cfg, RunConfig) and info == {"step": 7, "images_seen": 112, "ema": True,
                                                       "num_params": old["num_params"],
                                                       "world_size": old["world_size"]}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema.shadow[k].to(v.dtype)), k
    _, raw, info = load_run(str(tmp_path), use_ema=False)
    assert info["ema"] is False and all(torch.equal(v, old["model"][k]) for k, v in raw.state_dict().items())


def test_ema_state_dict_is_the_only_way_in_and_out():
    _, model = _tiny_glow()
    ema = EMA(model, 0.99)
    state = ema.state_dict()
    assert set(state) == {"decay", "shadow"}
    other = EMA(model, 0.5).to("cpu")
    other.load_state_dict(state)
    assert other.decay == 0.99
    with pytest.raises(FlowlabError, match="EMA weights do not match the model"):
        other.load_state_dict({"decay": 0.9, "shadow": {"not.a.weight": torch.zeros(1)}})


# ---- gradient accumulation -------------------------------------------------------------------------

IDF_TINY = ["model.levels=2", "model.steps=2", "model.hidden_channels=16", "model.hidden_blocks=2",
            f"data.path={SUBSET}", "data.max_train=256", "data.max_test=16", "train.batch_size=16",
            "train.init_batch_size=32", "train.warmup_steps=0", "train.grad_clip=0.3"]


def _train_in_process(tmp_path, overrides, steps=3):
    from engine.trainer import Trainer

    cfg = load_config(os.path.join(EXPERIMENTS, "idf_small.yaml"), IDF_TINY + overrides)
    trainer = Trainer(cfg, str(tmp_path), tensorboard=False)
    metrics = [trainer.train_step(s) for s in range(steps)]
    params = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    return metrics, params


def test_gradient_accumulation_gives_the_full_batch_step(tmp_path):
    """IDF's log P(x) draws no noise, so N micro-batches of 16/N must give the full batch's
    gradient (its norm, before clipping at 0.3, is logged) and the same parameters."""
    full, p1 = _train_in_process(tmp_path / "n1", ["train.grad_accum_steps=1"])
    for n in (2, 4):
        accumulated, pn = _train_in_process(tmp_path / f"n{n}", [f"train.grad_accum_steps={n}"])
        for a, b in zip(full, accumulated):
            assert float(b["grad_norm"]) == pytest.approx(float(a["grad_norm"]), rel=1e-5)
            assert float(b["bpd"]) == pytest.approx(float(a["bpd"]), rel=1e-6)
        assert ((pn - p1).norm() / p1.norm()).item() < 1e-6


def test_batch_not_divisible_by_the_micro_batches_is_one_error(tmp_path):
    from engine.trainer import Trainer

    cfg = load_config(os.path.join(EXPERIMENTS, "idf_small.yaml"), ["train.batch_size=16", "train.grad_accum_steps=3"])
    with pytest.raises(FlowlabError, match=r"train.batch_size=16 is not divisible by 1 process\(es\) x train.grad_accum_steps=3"):
        Trainer(cfg, str(tmp_path), tensorboard=False)
    with pytest.raises(FlowlabError, match="train.grad_accum_steps must be at least 1"):
        Trainer({**cfg, "train": {**cfg["train"], "grad_accum_steps": 0}}, str(tmp_path), tensorboard=False)
