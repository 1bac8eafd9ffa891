"""Configs: YAML files over typed defaults, with dotted ``key=value`` overrides.

A config has the sections below.  ``model`` keys come from the architecture's own
``DEFAULTS`` (``models.architectures``), ``dequantizer`` keys from
``models.builders.dequantizer`` (with the family's default kind and knob defaults),
``objective`` keys from the objective's class (``engine.objectives``, ``objective.name``
defaults to ``bpd``); every other section from ``DEFAULTS`` here.  Old key names (run
directories written before Contract v2) are moved to their current place first
(``engine.config_migrations``).  Unknown keys, values of the wrong type and values outside
a key's choices are one-line :class:`FlowlabError`\\ s.  The resolved config (every key,
defaults filled in) is what a run directory and its checkpoints carry;
``engine.sections.RunConfig`` is its typed view.

YAML files (``load_yaml``):

* ``base: other.yaml`` (a path relative to the file) inherits: the file's sections are
  merged key by key over the base file's (recursively, chains allowed; a cycle or a
  missing base file is a one-line error).
* a relative ``data.path`` in a file is taken relative to that file's directory when a
  file exists there, else as given (relative to the current directory, as before).  On
  the command line (``data.path=...``) it is always relative to the current directory.
"""
from __future__ import annotations

import copy
import os

import yaml

from common.errors import FlowlabError
from common.ranges import ANY, Range, above, at_least, between, each
from data import LOADERS, VECTOR_LOADERS, toy2d
from data.imagenet import VERSIONS as IMAGENET_VERSIONS
from engine.compile import BACKENDS as COMPILE_BACKENDS, MODES as COMPILE_MODES
from engine.cpu_malloc import MODES as CPU_MALLOC_MODES
from engine.config_migrations import upgrade
from engine.objectives import DEFAULT_OBJECTIVE, OBJECTIVES
from models.architectures import ARCHITECTURES, architecture, dequantizer_ranges, dequantizer_section
from models.core.activation_memory import MODES as ACTIVATION_MEMORY_MODES
from models.core.memory_format import MEMORY_FORMATS

DEFAULTS = {
    "data": {
        "name": "cifar10",       # images: cifar10 | cifar10_default | npz | mnist | fashion_mnist | imagenet32 |
                                 # imagenet64 | celeba | celeba_hq | folder | prepared (data.LOADERS); vectors: toy2d | none
        "root": "datasets",      # where torchvision data lives / downloads to (and the other sets' parent folder)
        "path": None,            # the .npz file for name=npz; the folder for folder / celeba_hq / imagenet* / celeba / prepared
        "version": "new",        # imagenet32/64: new (Chrabaszcz et al. 2017, npz) | old (van den Oord et al. 2016, PNG)
        "image_size": None,      # folder (required), celeba (64), celeba_hq (256): images resized to this
        "center_crop": 148,      # celeba: side of the central crop taken before resizing (Real NVP's 148)
        "test_fraction": 0.1,    # folder, celeba_hq: fraction of the images held out as the test split ...
        "split_seed": 0,         # ... drawn with this seed
        "download": True,
        "n_bits": 8,
        "hflip": False,          # random horizontal flips (train split only)
        "translate": 0.0,        # random shifts, fraction of the image size (train only)
        "max_train": None,       # keep only the first N images (smoke runs)
        "max_test": None,
        "toy": "two_moons",      # data.name=toy2d: which 2-D toy (data/toy2d.py DATASETS)
        "n_train": 20000,        # data.name=toy2d: seeded samples in the train split ...
        "n_test": 5000,          # ... and in the test split
        "dim": 2,                # data.name=none (no data: energy fits): dimension of the vectors
    },
    "train": {
        "steps": 1000,
        "batch_size": 64,        # global batch per optimizer step: split over processes and micro-batches
        "grad_accum_steps": 1,   # micro-batches per optimizer step (per process: batch_size / (world * this))
        "optimizer": "adam",     # adam | adamw | adamax
        "lr": 1e-3,
        "betas": [0.9, 0.999],
        "eps": 1e-8,             # optimizer epsilon (IDF: Adamax with 1e-7)
        "weight_decay": 0.0,
        "warmup_steps": 0,       # linear warm-up from 0
        "schedule": "constant",  # constant | cosine | exponential (after warm-up)
        "decay_rate": 1.0,       # exponential: lr *= decay_rate every decay_every_steps
        "decay_every_steps": 1,  # e.g. one epoch of steps for IDF's 0.999 per epoch
        "grad_clip": 0.0,        # max global grad norm; 0 = off
        "ema": 0.0,              # EMA decay; 0 = off. Eval and sampling use EMA when on
        "mixed_precision": "no", # no | bf16 (log-dets, priors, bpd stay float32)
        "compile": "none",       # none | default | max-autotune-no-cudagraphs: torch.compile of the model's forward (engine/compile.py)
        "compile_backend": "inductor",  # inductor | aot_eager | eager (Dynamo only: graph breaks, CPU tests)
        "memory_format": "contiguous",  # contiguous | channels_last: the conditioner networks' layout (models.core.memory_format)
        "cpu_malloc": "tuned",   # tuned | default: glibc keeps freed blocks for reuse on a CPU run (engine/cpu_malloc.py)
        "activation_memory": "store",  # what the backward keeps (models.core.activation_memory): store
                                 # (plain autograd) | checkpoint (each top-level layer recomputed) |
                                 # invertible (inputs rebuilt by the layers' own inverses; others checkpointed)
        "seed": 0,
        "time_limit_minutes": None,  # stop (evaluate, sample, checkpoint) after this much training time
        "init_batch_size": 256,  # data-dependent init batch (same on every rank)
        "max_nonfinite": 20,     # consecutive non-finite steps before training stops
        "log_every": 10,
        "layer_stats_every": 0,  # per-layer log-det / output statistics and diagnostics to TensorBoard; 0 = off
        "eval_every": 500,
        "sample_every": 500,
        "checkpoint_every": 500,
        "keep_checkpoints": 1,   # most recent checkpoints kept (checkpoint.pt + checkpoints/step_*.pt)
        "keep_best": True,       # also keep best.pt: the state with the lowest test bpd so far
        "nonfinite_rollback": 0, # on max_nonfinite: roll back to the last good checkpoint up to N times (0 = stop)
        "rollback_lr_factor": 0.5,  # ... multiplying the learning rate by this at each rollback
    },
    "eval": {
        "batch_size": 256,
        "max_examples": None,    # None = the whole split (no data: 10000 fresh samples)
        "iw_samples": 1,         # importance samples per example where the objective has an IS estimate (elbo)
        "iw_chunk": 64,          # importance samples per forward pass
        "seed": None,            # noise seed of eval.py's per-image draws; None = train.seed
        "chunk_images": None,    # eval.py: images per resumable chunk; None = about 2^16 forwards (>= 1 per process)
    },
    "sample": {
        "n": 64,
        "temperatures": [0.5, 0.7, 0.9, 1.0],
    },
    "paper": {                   # what the config reproduces (for eval.py --table)
        "name": None,
        "bpd": None,
        "params": None,
        "source": None,
    },
}

# Types of keys whose default is None (None stays allowed for them).
OPTIONAL_TYPES = {
    ("data", "path"): "", ("data", "image_size"): 0, ("data", "max_train"): 0, ("data", "max_test"): 0,
    ("train", "time_limit_minutes"): 0.0, ("eval", "max_examples"): 0,
    ("eval", "seed"): 0, ("eval", "chunk_images"): 0,
    ("paper", "name"): "", ("paper", "bpd"): 0.0, ("paper", "params"): 0, ("paper", "source"): "",
}

CHOICES = {
    ("data", "name"): (*LOADERS, *VECTOR_LOADERS),  # every registered loader
    ("data", "version"): IMAGENET_VERSIONS,
    ("data", "toy"): toy2d.DATASETS,
    ("train", "optimizer"): ("adam", "adamw", "adamax"),
    ("train", "schedule"): ("constant", "cosine", "exponential"),
    ("train", "mixed_precision"): ("no", "bf16"),
    ("train", "compile"): COMPILE_MODES,
    ("train", "compile_backend"): COMPILE_BACKENDS,
    ("train", "activation_memory"): ACTIVATION_MEMORY_MODES,
    ("train", "memory_format"): MEMORY_FORMATS,
    ("train", "cpu_malloc"): CPU_MALLOC_MODES,
}


# The valid range of every key of DEFAULTS that CHOICES does not restrict (common.ranges: a
# number checked here must also be finite; ANY: strings / booleans, only the type is checked).
# Model families, the dequantizer and objectives may declare theirs as ``RANGES`` too.
RANGES = {
    ("data", "root"): ANY, ("data", "path"): ANY, ("data", "download"): ANY,
    ("data", "n_bits"): between(1, 8), ("data", "hflip"): ANY, ("data", "translate"): between(0, 0.5),
    ("data", "max_train"): at_least(1), ("data", "max_test"): at_least(1),
    ("data", "image_size"): at_least(1), ("data", "center_crop"): at_least(1),
    ("data", "test_fraction"): between(0, 1, lo_open=True, hi_open=True), ("data", "split_seed"): at_least(0),
    ("data", "n_train"): at_least(1), ("data", "n_test"): at_least(1), ("data", "dim"): at_least(1),
    ("train", "steps"): at_least(1), ("train", "batch_size"): at_least(1),
    ("train", "grad_accum_steps"): at_least(1), ("train", "lr"): above(0),
    ("train", "betas"): each(between(0, 1, hi_open=True), length=2), ("train", "eps"): above(0),
    ("train", "weight_decay"): at_least(0), ("train", "warmup_steps"): at_least(0),
    ("train", "decay_rate"): between(0, 1, lo_open=True), ("train", "decay_every_steps"): at_least(1),
    ("train", "grad_clip"): at_least(0), ("train", "ema"): between(0, 1, hi_open=True),
    ("train", "seed"): between(0, 2**63 - 1), ("train", "time_limit_minutes"): above(0),
    ("train", "init_batch_size"): at_least(1), ("train", "max_nonfinite"): at_least(1),
    ("train", "log_every"): at_least(1), ("train", "layer_stats_every"): at_least(0),
    ("train", "eval_every"): at_least(0), ("train", "sample_every"): at_least(0),
    ("train", "checkpoint_every"): at_least(0), ("train", "keep_checkpoints"): at_least(1),
    ("train", "keep_best"): ANY, ("train", "nonfinite_rollback"): at_least(0),
    ("train", "rollback_lr_factor"): between(0, 1, lo_open=True, hi_open=True),
    ("eval", "batch_size"): at_least(1), ("eval", "max_examples"): at_least(1),
    ("eval", "iw_samples"): at_least(1), ("eval", "iw_chunk"): at_least(1),
    ("eval", "seed"): between(0, 2**63 - 1), ("eval", "chunk_images"): at_least(1),
    ("sample", "n"): at_least(1), ("sample", "temperatures"): each(at_least(0), min_length=1),
    ("paper", "name"): ANY, ("paper", "bpd"): above(0), ("paper", "params"): at_least(1), ("paper", "source"): ANY,
}


def check_range(key: str, value, allowed: Range | None) -> None:
    """A one-line error when ``value`` is outside ``allowed`` (see ``RANGES``)."""
    if allowed is not None and not allowed.accepts(value):
        raise FlowlabError(f"config key '{key}' must be {allowed}, got {value!r}")


def _check_value(key: str, value, default):
    """Type-check ``value`` against the default's type; returns the (coerced) value."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
        value = list(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        hint = ""
        if isinstance(default, str) and isinstance(value, bool):  # YAML 1.1: no/yes/off/on/false/true
            hint = f" (YAML reads unquoted no, yes, off and on as booleans: quote the word, e.g. {key}='no')"
        raise FlowlabError(f"config key '{key}' expects {type(default).__name__}, got {value!r}{hint}")
    return value


def _model_defaults(name) -> tuple[dict, dict, dict]:
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise FlowlabError(f"unknown model.name {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    module = architecture(name)
    return {"name": name, **module.DEFAULTS}, getattr(module, "CHOICES", {}), getattr(module, "RANGES", {})


def _dequantizer_defaults(name, given) -> tuple[dict, dict]:
    """The ``dequantizer`` section of family ``name``; a kind it does not support is a one-line error."""
    defaults, choices = dequantizer_section(name)
    kind = given.get("kind") if isinstance(given, dict) else None
    if kind is not None and kind not in choices["kind"]:
        if choices["kind"] == ("none",):
            raise FlowlabError(f"model '{name}' takes no dequantizer (it models its data as they are: integers, "
                               f"vectors or binary pixels): drop dequantizer.kind {kind!r} (or set it to 'none')")
        raise FlowlabError(f"model '{name}' supports dequantizer.kind {' | '.join(choices['kind'])}, got {kind!r}")
    return defaults, choices


def _objective_defaults(given) -> tuple[dict, dict, dict]:
    """Keys, choices and ranges of the ``objective`` section of the objective ``given`` names."""
    name = given.get("name", DEFAULT_OBJECTIVE) if isinstance(given, dict) else DEFAULT_OBJECTIVE
    if not isinstance(name, str) or name not in OBJECTIVES:
        raise FlowlabError(f"unknown objective.name {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    return {"name": name, **copy.deepcopy(cls.DEFAULTS)}, dict(cls.CHOICES), dict(getattr(cls, "RANGES", {}))


def resolve(raw: dict) -> dict:
    """Fill defaults into a raw config and check every key, type, choice and range."""
    if not isinstance(raw, dict):
        raise FlowlabError(f"a config must be a mapping of sections (model, data, train, ...), got a "
                           f"{type(raw).__name__}")
    raw = upgrade(raw)
    unknown = set(raw) - set(DEFAULTS) - {"model", "dequantizer", "objective"}
    if unknown:
        raise FlowlabError(f"unknown config section(s) {sorted(unknown)}; known: model, dequantizer, "
                           f"{', '.join(DEFAULTS)}, objective")
    for section, given in raw.items():
        if given is not None and not isinstance(given, dict):
            raise FlowlabError(f"config section '{section}' must be a mapping of keys, got {given!r}")
    model_raw = raw.get("model") or {}
    if "name" not in model_raw:
        raise FlowlabError("config needs model.name (one of: " + ", ".join(sorted(ARCHITECTURES)) + ")")
    model_defaults, model_choices, model_ranges = _model_defaults(model_raw["name"])
    deq_defaults, deq_choices = _dequantizer_defaults(model_raw["name"], raw.get("dequantizer"))
    objective_defaults, objective_choices, objective_ranges = _objective_defaults(raw.get("objective"))
    sections = {"model": model_defaults, "dequantizer": deq_defaults, **copy.deepcopy(DEFAULTS),
                "objective": objective_defaults}
    choices = {**CHOICES, **{("model", k): v for k, v in model_choices.items()},
               **{("dequantizer", k): v for k, v in deq_choices.items()},
               **{("objective", k): v for k, v in objective_choices.items()}}
    ranges = {**RANGES, **{("model", k): v for k, v in model_ranges.items()},
              **{("dequantizer", k): v for k, v in dequantizer_ranges().items()},
              **{("objective", k): v for k, v in objective_ranges.items()}}
    resolved = {}
    for section, defaults in sections.items():
        given = raw.get(section) or {}
        if not isinstance(given, dict):
            raise FlowlabError(f"config section '{section}' must be a mapping")
        for key in given:
            if key not in defaults:
                raise FlowlabError(f"unknown config key '{section}.{key}'; known: {', '.join(defaults)}")
        out = {}
        for key, default in defaults.items():
            value = _check_value(f"{section}.{key}", given.get(key, default), OPTIONAL_TYPES.get((section, key), default))
            allowed = choices.get((section, key))
            if allowed is not None and value not in allowed:
                raise FlowlabError(f"config key '{section}.{key}' must be one of {list(allowed)}, got {value!r}")
            check_range(f"{section}.{key}", value, ranges.get((section, key)))
            out[key] = value
        resolved[section] = out
    return resolved


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config."""
    if not isinstance(raw, dict):
        raise FlowlabError(f"a config must be a mapping of sections (model, data, train, ...), got a "
                           f"{type(raw).__name__}")
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise FlowlabError(f"override {item!r} is not of the form section.key=value")
        key, text = item.split("=", 1)
        parts = key.split(".")
        if len(parts) != 2 or not all(parts):
            raise FlowlabError(f"override key {key!r} must be section.key (e.g. train.steps=200)")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            raise FlowlabError(f"override {item!r}: value is not valid YAML") from None
        section = raw.setdefault(parts[0], {})
        if section is None:
            section = raw[parts[0]] = {}
        if not isinstance(section, dict):
            raise FlowlabError(f"config section '{parts[0]}' must be a mapping of keys, got {section!r}")
        section[parts[1]] = value
    return raw


def _read_yaml(path: str):
    if not os.path.isfile(path):
        raise FlowlabError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise FlowlabError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise FlowlabError(f"config file {path} is not a text (YAML) file") from None
    except OSError as e:
        raise FlowlabError(f"cannot read config file {path}: {e.strerror}") from None
    return {} if raw is None else raw


def _data_path_from_file(raw: dict, path: str) -> None:
    """A relative ``data.path`` in the file ``path``: relative to the file's directory when a
    file exists there, else left as given (relative to the current directory)."""
    data = raw.get("data")
    given = data.get("path") if isinstance(data, dict) else None
    if isinstance(given, str) and given and not os.path.isabs(given):
        here = os.path.normpath(os.path.join(os.path.dirname(path), given))
        if os.path.exists(here):
            data["path"] = here


def merge_sections(base: dict, child: dict) -> dict:
    """``child`` merged over ``base`` key by key, recursively into mappings (a new dict); a
    child's empty section (``eval:`` with nothing under it) keeps the base's."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(out.get(key), dict) and (isinstance(value, dict) or value is None):
            out[key] = merge_sections(out[key], value or {})
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str, _chain: tuple = ()) -> dict:
    """The raw config of a YAML file, with its ``base:`` chain merged under it and relative
    ``data.path``\\ s resolved per file (see the module docstring)."""
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise FlowlabError(f"config file {path} must hold a mapping of sections (model, data, train, ...), "
                           f"not a {type(raw).__name__}")
    _data_path_from_file(raw, path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    chain = (*_chain, os.path.realpath(path))
    if not isinstance(base, str) or not base:
        raise FlowlabError(f"config file {path}: 'base' must be the path of another config file, got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    if not os.path.isfile(base_path):
        raise FlowlabError(f"config file {path}: its base file {base_path} does not exist")
    if os.path.realpath(base_path) in chain:
        raise FlowlabError(f"config file {path}: 'base' chain has a cycle ({' -> '.join([*chain, os.path.realpath(base_path)])})")
    return merge_sections(load_yaml(base_path, chain), raw)


def load_config(path: str, overrides: list[str] = ()) -> dict:
    """Load a YAML config (with its ``base:`` chain), apply overrides and resolve it."""
    return resolve(apply_overrides(load_yaml(path), list(overrides)))


def dump_config(cfg: dict) -> str:
    """A resolved config as YAML, sections in order (what ``train.py --print-config`` prints)."""
    return yaml.safe_dump(cfg, sort_keys=False)


def save_config(cfg: dict, path: str) -> None:
    with open(path, "w") as f:
        f.write(dump_config(cfg))
