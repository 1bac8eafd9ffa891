"""Config migrations: configs written with older key names resolve to the current ones.

Run directories and checkpoints carry their resolved config with the keys of the version
that wrote it.  ``upgrade(raw) -> raw`` (called first by ``engine.config.resolve``) rewrites
such a config into the current names, so ``resolve(old)`` is the current config and the model
built from it has exactly the parameters (names and shapes) of the one that was saved.

Contract v2 (the README's "Config glossary"):

* one name per knob in every family: ``levels``, ``steps``, ``hidden_channels``,
  ``hidden_blocks`` (``RENAMED``, per family: the same old name meant different knobs);
* the dequantizer moved from ``model`` to the top-level ``dequantizer`` section
  (``TO_DEQUANTIZER``).  Old Flow++ configs shared ``heads``, ``components``, ``attention``
  and ``dropout`` between the main flow and the dequantizer, so an old Flow++ config (one
  with any of its old-only keys: every resolved one has them) also copies those four into
  the section (``SHARED``), unless the section sets them.

Old names in a new config are accepted and moved (no family reuses an old name for another
knob, so the move is unambiguous); a config that gives an old key and its new name both is a
one-line error naming both.
"""
from __future__ import annotations

import copy

from common.errors import FlowlabError

# family -> {old model key: new model key}
RENAMED = {
    "glow": {"depth": "steps"},
    "argmax": {"depth": "steps"},
    "flowpp": {"filters": "hidden_channels", "blocks": "hidden_blocks"},
    "realnvp": {"scales": "levels", "num_blocks": "hidden_blocks", "features": "hidden_channels"},
    "ffjord": {"scales": "levels", "blocks": "steps", "hidden_dims": "hidden_channels"},
    "resflow": {"blocks": "steps", "fc_blocks": "fc_steps", "fc_hidden": "fc_hidden_channels"},
    "idf": {"flows_per_level": "steps", "densenet_depth": "hidden_blocks"},
}

# family -> {old model key: key of the dequantizer section}
TO_DEQUANTIZER = {
    "glow": {"dequantization": "kind"},
    "flowpp": {"dequantization": "kind", "dequant_steps": "steps", "dequant_filters": "hidden_channels",
               "dequant_blocks": "hidden_blocks", "context_channels": "context_channels",
               "context_blocks": "context_blocks"},
    "argmax": {"encoding": "encoding", "noise_steps": "steps", "noise_filters": "hidden_channels",
               "noise_blocks": "hidden_blocks", "noise_components": "components", "noise_heads": "heads",
               "noise_attention": "attention", "context_channels": "context_channels",
               "context_blocks": "context_blocks", "dropout": "dropout"},
    "realnvp": {"dequantization": "kind"},
    "ffjord": {"dequantization": "kind"},
    "resflow": {"dequantization": "kind"},
}

# family -> model keys an old config also used for its dequantizer (they stay in model too)
SHARED = {"flowpp": ("heads", "components", "attention", "dropout")}


def old_keys(name: str) -> dict:
    """{old model key: "section.new_key"} of family ``name``."""
    return {**{k: f"model.{v}" for k, v in RENAMED.get(name, {}).items()},
            **{k: f"dequantizer.{v}" for k, v in TO_DEQUANTIZER.get(name, {}).items()}}


def upgrade(raw: dict) -> dict:
    """``raw`` with every old key of its family moved to its current place (a new dict when
    anything moved; ``raw`` itself is never modified)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        return raw
    name = raw["model"].get("name")
    if not isinstance(name, str):
        return raw
    renamed, moved = RENAMED.get(name, {}), TO_DEQUANTIZER.get(name, {})
    old = [k for k in raw["model"] if k in renamed or k in moved]
    if not old or not isinstance(raw.get("dequantizer") or {}, dict):
        return raw  # nothing to do (or a malformed section, which resolve reports)
    raw = copy.deepcopy(raw)
    model, deq = raw["model"], dict(raw.get("dequantizer") or {})
    for key in old:
        section, new = ("model", renamed[key]) if key in renamed else ("dequantizer", moved[key])
        target = model if section == "model" else deq
        if new in target:
            raise FlowlabError(f"config gives both model.{key} (the old name) and {section}.{new}: "
                               f"keep only {section}.{new}")
        target[new] = model.pop(key)
    for key in SHARED.get(name, ()):
        if key in model:
            deq.setdefault(key, model[key])
    if deq:
        raw["dequantizer"] = deq
    return raw
