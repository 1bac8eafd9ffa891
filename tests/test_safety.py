"""Safety: no code runs from a checkpoint, no good checkpoint is lost, one run per directory,
lossless means lossless, and every bad input is one clear line (issue 13)."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from common.errors import FlowlabError
from compression.image_files import matches_files, read_images
from engine.checkpoint import TrainingState, checkpoint_path, load_checkpoint, save_checkpoint
from engine.cli import run_cli
from engine.config import CHOICES, DEFAULTS, RANGES, load_config, resolve
from models.architectures import ARCHITECTURES, architecture
from engine.ema import EMA
from engine.model_file import ModelFile
from engine.run import load_run
from engine.run_lock import LOCK_NAME, RunLock
from engine.setup import make_model, make_optimizer
from tests.helpers import ROOT, SUBSET, read_metric, run_command
from tests.test_training import TINY, train

EXPERIMENTS = os.path.join(ROOT, "experiments")


def one_line_error(proc, *fragments):
    """The process failed with exit code 2 and exactly one ``error:`` line holding ``fragments``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
    lines = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    assert ("\n" + proc.stderr).count("\nerror: ") == 1, "the error line must start a line of its own"
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def tiny_state(data_path=SUBSET, ema=False, overrides=()) -> TrainingState:
    """A training state of a tiny Glow on 32x32 RGB images (no training needed)."""
    cfg = load_config(os.path.join(EXPERIMENTS, "glow_small.yaml"),
                      ["model.levels=2", "model.steps=1", "model.hidden_channels=8", f"data.path={data_path}",
                       "data.max_test=16", *overrides])
    model = make_model(cfg, (3, 32, 32), 8)
    model.data_init(torch.randint(0, 256, (8, 3, 32, 32)))
    optimizer = make_optimizer(cfg, model.parameters())
    return TrainingState.capture(cfg, model, optimizer, EMA(model, 0.9) if ema else None, step=5, images_seen=80,
                                 data_shape=(3, 32, 32))


# ---- 1. no code runs from a checkpoint ----------------------------------------------------------

class _Payload:
    """Unpickled, this runs ``touch MARKER``: what a malicious shared checkpoint carries."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_the_payload_is_real(tmp_path):
    """The control: unpickling the payload does run it (so the marker checks below can fail)."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(str(marker))))
    assert marker.exists()


def test_a_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    # a real format-1 checkpoint (torch.save of the dict), with the payload hidden as an extra key
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format_version": 1, **tiny_state().to_dict(), "extra": _Payload(str(marker))},
               checkpoint_path(str(run)))
    # ... and a file that is nothing but the payload, pickled by torch and by plain pickle
    bare = tmp_path / "bare.pt"
    torch.save(_Payload(str(marker)), bare)
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"format_version": 1, "model": {}, "x": _Payload(str(marker))}))
    for path in (checkpoint_path(str(run)), str(bare), str(plain)):
        with pytest.raises(FlowlabError, match="refusing to load .* could run code") as e:
            load_checkpoint(path)
        assert "\n" not in str(e.value) and (path == str(plain) or "posix.system" in str(e.value))
    dummy = tmp_path / "x.flic"
    dummy.write_bytes(b"FLIC")
    for cmd in (["eval.py", str(run)],
                ["sample.py", str(run), "--out", str(tmp_path / "g.png")],
                ["train.py", "experiments/glow_small.yaml", "--out", str(run), "--resume", *TINY],
                ["compress.py", str(run), "--split", "test", "--out", str(tmp_path / "t.flic")],
                ["decompress.py", str(dummy), "--run", str(run), "--out", str(tmp_path / "dec")]):
        proc = run_command([sys.executable, *cmd], check=False)
        one_line_error(proc, "refusing to load", "posix.system")
        assert not marker.exists(), f"{cmd[0]} ran the checkpoint's payload"


def test_format_2_holds_only_data_and_format_1_still_loads(tmp_path):
    state = tiny_state(ema=True)
    path = str(tmp_path / "checkpoint.pt")
    state.save(path)
    with open(path, "rb") as f:
        assert f.read(9)[8:9] == b"{"  # safetensors: a length, then a JSON header; no pickle anywhere
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # not a pickle at all
    back = TrainingState.load(path)
    assert back.step == 5 and back.data_shape == (3, 32, 32) and back.config == state.config
    assert all(torch.equal(back.model[k], v) for k, v in state.model.items())
    assert back.optimizer["param_groups"] == state.optimizer["param_groups"]
    old = tmp_path / "old.pt"  # what earlier code wrote: loads with weights-only unpickling
    torch.save({"format_version": 1, **{k: v for k, v in state.to_dict().items()
                                        if k not in ("lr_scale", "rollbacks", "test_bpd")}}, old)
    assert TrainingState.load(str(old)).lr_scale == 1.0
    # another safetensors file is not a checkpoint
    ModelFile.from_state(state).save(str(tmp_path / "model.safetensors"))
    with pytest.raises(FlowlabError, match="not a flowlab training-state file"):
        load_checkpoint(str(tmp_path / "model.safetensors"))


def test_checkpoints_get_the_users_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        tiny_state().save(str(tmp_path / "checkpoint.pt"))
    finally:
        os.umask(previous)
    assert os.stat(tmp_path / "checkpoint.pt").st_mode & 0o777 == 0o640
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_load_run_takes_a_run_directory_a_checkpoint_or_the_exported_model(tmp_path):
    state = tiny_state(ema=True)
    run = tmp_path / "run"
    run.mkdir()
    state.save(checkpoint_path(str(run)))
    ModelFile.from_state(state).save(str(run / "model.safetensors"))
    _, from_dir, info = load_run(str(run))
    _, from_file, file_info = load_run(str(run / "model.safetensors"))
    assert info == file_info and info["ema"] is True
    for k, v in from_dir.state_dict().items():
        assert torch.equal(v, from_file.state_dict()[k]), k
    with pytest.raises(FlowlabError, match="holds only the EMA weights"):
        load_run(str(run / "model.safetensors"), use_ema=False)
    # a folder with only the exported model (as shared) loads too
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    assert load_run(str(shared))[2]["step"] == 5


def test_a_checkpoint_of_another_family_than_its_run_config_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    tiny_state().save(checkpoint_path(str(run)))
    flowpp = load_config(os.path.join(EXPERIMENTS, "flowpp_small.yaml"))
    (run / "config.yaml").write_text(json.dumps(flowpp))  # JSON is YAML
    with pytest.raises(FlowlabError, match="holds a 'glow' model but .* describes a 'flowpp' run"):
        load_run(str(run))
    glow = load_config(os.path.join(EXPERIMENTS, "glow_small.yaml"))  # same family, other model
    (run / "config.yaml").write_text(json.dumps(glow))
    with pytest.raises(FlowlabError, match="refusing a checkpoint of another model"):
        load_run(str(run))


# ---- 2. a diverging run never replaces the last good checkpoint -------------------------------------

def test_a_diverging_run_keeps_the_good_checkpoint_byte_for_byte(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2", "train.checkpoint_every=2")
    good = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "model.safetensors")}
    proc = train(out, "train.steps=40", "train.lr=1e12", "train.max_nonfinite=3", "train.checkpoint_every=1",
                 "train.eval_every=1", resume=True, check=False)
    one_line_error(proc, "training stopped: 3 consecutive non-finite steps",
                   "the last good checkpoint (step 2")
    assert "warning: no checkpoint at step 3: its weights give a non-finite loss" in proc.stdout
    assert "no checkpoint at step 4: the run is in a non-finite streak" in proc.stdout
    for name, data in good.items():
        assert (out / name).read_bytes() == data, f"{name} was replaced"
    # metrics never repeat the last finite training values during the streak
    assert sorted(read_metric(out, "train/bpd")) == [1, 2, 3]
    assert read_metric(out, "train/nonfinite_streak") == {4: 1, 5: 2}
    proc = run_command([sys.executable, "eval.py", str(out), "--json", str(tmp_path / "e.json")])
    assert 1.0 < json.load(open(tmp_path / "e.json"))["bpd"] < 9.0


def test_nonfinite_rollback_returns_to_the_last_good_checkpoint_with_a_lower_lr(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2", "train.checkpoint_every=2")
    proc = train(out, "train.steps=8", "train.lr=1e12", "train.max_nonfinite=2", "train.checkpoint_every=2",
                 "train.nonfinite_rollback=1", "train.rollback_lr_factor=1e-15", resume=True)
    assert "rolled back to the last good checkpoint (step 2) with the learning rate x1e-15" in proc.stdout
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == 8 and state["rollbacks"] == 1 and state["lr_scale"] == pytest.approx(1e-15)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    counts = Counter((r["step"], next(k for k in r if k not in ("step", "images_seen"))) for r in rows)
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert sorted(read_metric(out, "train/bpd")) == list(range(1, 9))
    moved = [json.loads(line) for line in open(out / "metrics.rolled_back.jsonl")]
    assert moved and all(r["step"] > 2 for r in moved)


def test_keep_checkpoints_best_and_the_exported_model(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=6", "train.checkpoint_every=2", "train.eval_every=2", "train.keep_checkpoints=2",
          "train.ema=0.9")
    assert os.listdir(out / "checkpoints") == ["step_0000004.pt"]
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 6
    assert load_checkpoint(str(out / "checkpoints" / "step_0000004.pt"))["step"] == 4
    bpd = {s: v for s, v in read_metric(out, "test/bpd").items() if s > 0}
    best = load_checkpoint(str(out / "best.pt"))
    assert best["step"] == min(bpd, key=bpd.get) and best["test_bpd"] == pytest.approx(min(bpd.values()))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "checkpoint.pt").st_mode & 0o777 == 0o666 & ~umask
    results = []
    for source in (out, out / "model.safetensors", out / "best.pt"):
        js = tmp_path / f"{source.name}.json"
        run_command([sys.executable, "eval.py", str(source), "--json", str(js)])
        results.append(json.load(open(js)))
    assert results[0]["bpd"] == results[1]["bpd"] and results[1]["ema"] is True and results[1]["step"] == 6
    assert results[2]["step"] == best["step"]
    proc = run_command([sys.executable, "sample.py", str(out / "model.safetensors"), "--n", "2",
                        "--out", str(tmp_path / "g.png")])
    assert "non-finite pixels: 0" in proc.stdout


# ---- 3. one run per directory ------------------------------------------------------------------

def test_run_lock_is_exclusive_and_recognises_stale_locks(tmp_path):
    with RunLock(str(tmp_path)) as lock:
        assert lock.stale is None
        with pytest.raises(FlowlabError, match=rf"is in use by another run \(process {os.getpid()} "):
            RunLock(str(tmp_path)).acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    # a holder killed with SIGKILL leaves its lock file, but not its lock
    code = (f"import os; from engine.run_lock import RunLock; "
            f"RunLock({str(tmp_path)!r}).acquire(); print(os.getpid(), flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL
    pid = int(proc.stdout)
    with RunLock(str(tmp_path)) as lock:
        assert lock.stale["pid"] == pid and f"process {pid}" in lock.stale_message()


def test_a_second_run_on_a_directory_in_use_exits_with_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(str(out)):  # the first run, provably inside its lock
        proc = train(out, "train.steps=2", check=False)
        one_line_error(proc, str(out), "is in use by another run", f"process {os.getpid()}")
        assert sorted(os.listdir(out)) == [LOCK_NAME]  # the second run touched nothing
        proc = train(out, "train.steps=2", resume=True, check=False)
        one_line_error(proc, "is in use by another run")
    train(out, "train.steps=2")  # released: the directory is free again
    assert not (out / LOCK_NAME).exists()


def test_resume_after_a_crash_tidies_the_run_directory(tmp_path):
    out = tmp_path / "run"
    train(out, "train.steps=2", "train.checkpoint_every=2")
    # what a kill -9 at step 4, during a checkpoint write, leaves behind
    state = load_checkpoint(str(out / "checkpoint.pt"))
    state["world_size"] = 2  # ... by a run on two processes
    save_checkpoint({k: v for k, v in state.items() if k != "format_version"}, str(out / "checkpoint.pt"))
    with open(out / "metrics.jsonl", "a") as f:
        for step in (3, 4):
            f.write(json.dumps({"step": step, "images_seen": 16 * step, "train/bpd": 7.0}) + "\n")
        f.write('{"step": 5, "images_se')
    (out / ".tmp-1a2b3c-checkpoint.pt").write_bytes(b"half a checkpoint")
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday"}))
    proc = train(out, "train.steps=4", resume=True)
    assert "was locked by process 999999 on gone" in proc.stdout and "taking the lock over" in proc.stdout
    assert "removed 1 temporary file(s)" in proc.stdout and not (out / ".tmp-1a2b3c-checkpoint.pt").exists()
    assert "dropped 3 row(s) of metrics.jsonl after step 2" in proc.stdout
    assert "written by 2 process(es), resuming on 1: the same run" in proc.stdout
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r["step"] for r in rows if "train/bpd" in r]
    assert steps == [1, 2, 3, 4]
    assert not (out / LOCK_NAME).exists()


# ---- 4. lossless means lossless ---------------------------------------------------------------------

def _png(path, array, mode=None):
    from PIL import Image
    Image.fromarray(array, mode).save(path)
    return str(path)


def test_image_files_the_model_cannot_code_are_refused(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rgba = _png(tmp_path / "rgba.png", np.dstack([rgb, rng.integers(0, 256, (32, 32), dtype=np.uint8)]))
    shape = (3, 32, 32)
    with pytest.raises(FlowlabError, match="has an alpha channel"):
        read_images([rgba], shape=shape)
    deep = tmp_path / "deep.png"
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(deep)
    with pytest.raises(FlowlabError, match="16-bit samples"):
        read_images([str(deep)], shape=(1, 32, 32))
    with pytest.raises(FlowlabError, match=r"cannot be the model's 3 channel\(s\) of 32x32"):
        read_images([_png(tmp_path / "small.png", rgb[:16, :16])], shape=shape)
    with pytest.raises(FlowlabError, match=r"cannot be the model's 3 channel\(s\)"):
        read_images([_png(tmp_path / "gray.png", rgb[..., 0])], shape=shape)
    with pytest.raises(FlowlabError, match="values up to"):
        read_images([_png(tmp_path / "rgb.png", rgb)], shape=shape, num_bits=5)
    # what can be coded: RGB, and a palette image (as its colours), verified against the file
    pal = tmp_path / "pal.png"
    Image.fromarray(rgb).quantize(16).save(pal)
    images = read_images([str(tmp_path / "rgb.png"), str(pal)], shape=shape)
    assert images.shape == (2, 3, 32, 32) and np.array_equal(images[0], rgb.transpose(2, 0, 1))
    assert matches_files(images, [str(tmp_path / "rgb.png"), str(pal)])
    # "verified" compares the files' own pixels: the RGB of an RGBA file is not its content
    assert not matches_files(rgb.transpose(2, 0, 1)[None], [rgba])


def test_compress_refuses_alpha_and_a_grayscale_idf_codes_grayscale_pngs(tmp_path):
    from engine.trainer import run_training
    with np.load(SUBSET) as f:
        gray = {k: f[k][:48].mean(axis=-1).astype(np.uint8) for k in ("x_train", "x_test")}  # (N, 32, 32)
    np.savez(tmp_path / "gray.npz", **gray)
    cfg = load_config(os.path.join(EXPERIMENTS, "idf_small.yaml"), [
        f"data.path={tmp_path / 'gray.npz'}", "data.hflip=false", "train.steps=1", "train.batch_size=16",
        "train.init_batch_size=16", "train.eval_every=0", "train.sample_every=0", "train.checkpoint_every=1",
        "model.levels=2", "model.steps=1", "model.hidden_channels=8", "model.hidden_blocks=1"])
    run = tmp_path / "run"
    run_training(cfg, str(run))
    pngs = [_png(tmp_path / f"g{i}.png", gray["x_test"][i]) for i in range(3)]
    proc = run_command([sys.executable, "compress.py", str(run / "model.safetensors"), *pngs, "--out",
                        str(tmp_path / "g.flic")])
    assert json.loads(proc.stdout)["verified"] is True
    run_command([sys.executable, "decompress.py", str(tmp_path / "g.flic"), "--run", str(run), "--out",
                 str(tmp_path / "dec")])
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "dec" / "00001.png")), gray["x_test"][1])
    rgba = _png(tmp_path / "rgba.png", np.dstack([gray["x_test"][0]] * 4))
    proc = run_command([sys.executable, "compress.py", str(run), rgba, "--out", str(tmp_path / "a.flic")],
                       check=False)
    one_line_error(proc, "has an alpha channel")
    assert not (tmp_path / "a.flic").exists()


# ---- 5. every bad input is one clear line ---------------------------------------------------------

def test_every_engine_key_declares_its_valid_range():
    for section, keys in DEFAULTS.items():
        for key in keys:
            assert (section, key) in RANGES or (section, key) in CHOICES, f"{section}.{key} declares no range"


def _numeric(value) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_numeric(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_every_numeric_model_key_of_every_family_declares_its_valid_range(family):
    module = architecture(family)
    ranges, choices = getattr(module, "RANGES", {}), getattr(module, "CHOICES", {})
    missing = [k for k, v in module.DEFAULTS.items() if _numeric(v) and k not in ranges and k not in choices]
    assert not missing, f"model '{family}': {missing} declare no range (RANGES in models/architectures/{family}.py)"
    for key, r in ranges.items():  # and the defaults are inside their own ranges
        assert r.accepts(module.DEFAULTS[key]), (family, key, module.DEFAULTS[key], str(r))


@pytest.mark.parametrize("override, message", [
    ("train.lr=nan", "'train.lr' must be > 0, got nan"), ("train.lr=-1", "'train.lr' must be > 0"),
    ("train.log_every=0", "'train.log_every' must be >= 1"), ("train.steps=-1", "'train.steps' must be >= 1"),
    ("train.betas=[0.9, 1.5]", "'train.betas' must be a list of 2 numbers, each in [0, 1)"),
    ("train.ema=1", "'train.ema' must be in [0, 1)"), ("sample.temperatures=[]", "at least 1"),
    ("sample.temperatures=[.nan]", "each >= 0"), ("eval.max_examples=-5", "'eval.max_examples' must be >= 1"),
    ("data.n_bits=9", "'data.n_bits' must be in [1, 8]"), ("model.levels=0", "'model.levels' must be >= 1"),
    ("dequantizer.dropout=1.5", "'dequantizer.dropout' must be in [0, 1)"),
    ("train.rollback_lr_factor=1", "must be in (0, 1)"),
])
def test_values_outside_their_range_are_one_line_errors(override, message):
    with pytest.raises(FlowlabError) as e:
        load_config(os.path.join(EXPERIMENTS, "glow_small.yaml"), [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_malformed_config_structure_is_one_line_errors(tmp_path):
    for text, message in [("- a\n- b\n", "must hold a mapping of sections"),
                          ("model: {name: glow}\ntrain: fast\n", "config section 'train' must be a mapping"),
                          ("model: glow\n", "config section 'model' must be a mapping"),
                          ("model: {name: [glow]}\n", "unknown model.name")]:
        path = tmp_path / "c.yaml"
        path.write_text(text)
        for overrides in ([], ["train.steps=3"]):
            with pytest.raises(FlowlabError, match=message):
                load_config(str(path), overrides)
    with pytest.raises(FlowlabError, match="must be a mapping of sections"):
        resolve([{"model": "glow"}])


def test_bad_training_inputs_are_one_line_errors(tmp_path):
    as_list = tmp_path / "list.yaml"
    as_list.write_text("- model\n- train\n")
    as_string = tmp_path / "string.yaml"
    as_string.write_text("model: {name: glow}\ntrain: fast\n")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    empty = tmp_path / "empty.npz"
    np.savez(empty, x_train=np.zeros((0, 32, 32, 3), np.uint8), x_test=np.zeros((0, 32, 32, 3), np.uint8))
    cases = [(["train.lr=nan"], "train.lr"), (["train.lr=-1"], "train.lr"), (["train.log_every=0"], "train.log_every"),
             (["train.steps=-1"], "train.steps"), ([f"data.path={empty}"], "has no train images")]
    for overrides, message in cases:
        one_line_error(train(tmp_path / "x", *overrides, check=False), message)
    for config, message in [(as_list, "must hold a mapping"), (as_string, "section 'train' must be a mapping")]:
        proc = run_command([sys.executable, "train.py", str(config), "--out", str(tmp_path / "y"), "train.steps=2"],
                           check=False)
        one_line_error(proc, message)
    one_line_error(train(a_file, check=False), f"--out {a_file} is a file")
    locked = tmp_path / "readonly"
    locked.mkdir()
    if os.geteuid() != 0:
        locked.chmod(0o500)
    elif subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory unwritable for root here")
    try:
        one_line_error(train(locked / "run", check=False), str(locked / "run"))
        one_line_error(train(locked, check=False), "cannot write to run directory", str(locked))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)])
        locked.chmod(0o700)
    # FLOWLAB_DEBUG=1 shows the traceback of the same error
    proc = run_command([sys.executable, "train.py", "experiments/glow_small.yaml", "--out", str(tmp_path / "z"),
                        "train.lr=nan"], env={"FLOWLAB_DEBUG": "1"}, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "FlowlabError" in proc.stderr


def test_bad_sample_and_eval_arguments_are_one_line_errors(tmp_path):
    missing = str(tmp_path / "no" / "such" / "folder")
    for cmd, message in [(["sample.py", "RUN", "--n", "0"], "--n must be at least 1"),
                         (["sample.py", "RUN", "--n", "-3"], "--n must be at least 1"),
                         (["sample.py", "RUN", "--temperature", "nan"], "--temperature must be a finite number"),
                         (["sample.py", "RUN", "--out", f"{missing}/g.png"], "does not exist"),
                         (["sample.py", "RUN", "--out", str(tmp_path / "g.txt")], "unknown image extension"),
                         (["eval.py", "RUN", "--max-examples", "-5"], "--max-examples must be at least 1"),
                         (["eval.py", "RUN", "--json", f"{missing}/e.json"], "does not exist"),
                         (["eval.py", str(tmp_path / "nothing")], "run directory or model file not found")]:
        one_line_error(run_command([sys.executable, *cmd], check=False), message)


def test_evaluating_nan_weights_or_an_empty_split_is_an_error(tmp_path):
    nan_run = tmp_path / "nan"
    nan_run.mkdir()
    state = tiny_state()
    name = next(k for k, v in state.model.items() if v.is_floating_point())
    state.model[name] = torch.full_like(state.model[name], float("nan"))
    state.save(checkpoint_path(str(nan_run)))
    empty = tmp_path / "empty_test.npz"
    np.savez(empty, x_train=np.zeros((8, 32, 32, 3), np.uint8), x_test=np.zeros((0, 32, 32, 3), np.uint8))
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    tiny_state(data_path=str(empty)).save(checkpoint_path(str(empty_run)))
    for cmd, message in [(["eval.py", str(nan_run)], "holds non-finite weights"),
                         (["sample.py", str(nan_run), "--out", str(tmp_path / "g.png")], "holds non-finite weights"),
                         (["eval.py", str(empty_run)], "has no test images")]:
        one_line_error(run_command([sys.executable, *cmd], check=False), message)


def test_run_cli_keeps_real_bugs_visible(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FLOWLAB_DEBUG", raising=False)

    def bug():
        raise ValueError("a real bug")

    with pytest.raises(ValueError, match="a real bug"):
        run_cli(bug)

    def unreadable():
        open(tmp_path / "missing" / "file.txt")

    with pytest.raises(SystemExit) as e:
        run_cli(unreadable)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No such file or directory" in err and "missing/file.txt" in err
    monkeypatch.setenv("FLOWLAB_DEBUG", "1")
    with pytest.raises(FlowlabError):
        run_cli(lambda: (_ for _ in ()).throw(FlowlabError("shown with its traceback")))
