"""engine/cpu_malloc.py: ``train.cpu_malloc`` keeps freed blocks in the heap (no page faults when a
step's large activations come back), leaves the user's own allocator settings alone, and the
trainer applies it on the CPU.  The allocator is process-wide, so its effect is measured in fresh
processes, not in the test process."""
import os
import subprocess
import sys

import pytest

from engine.cpu_malloc import _user_setting, apply_cpu_malloc
from tests.helpers import ROOT

# minor page faults of the last 3 of 16 "steps" that each write and free tensors of 8, 16, 33 and
# 64 MiB (as a training step's activations come and go; tuned, the heap settles after 4-7 steps
# here, as the aligned blocks find freed space that fits them); the mode from argv
FAULTS = """
import resource, sys, torch
from engine.cpu_malloc import _user_setting, apply_cpu_malloc
print(apply_cpu_malloc(sys.argv[1]))
faults = []
for step in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(mib * 262144) for mib in (8, 16, 33, 64)]
    for t in tensors:
        t.fill_(1.0)
    del tensors
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[-3:]))
"""
PAGES_PER_STEP = (8 + 16 + 33 + 64) * 1024 * 1024 // 4096


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def _faults(mode: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    proc = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    status, faults = proc.stdout.split()
    return status, int(faults)


def test_tuned_reuses_freed_blocks_without_faults():
    status, tuned = _faults("tuned")
    if not _is_glibc():  # the setting is glibc's; elsewhere it must say so and change nothing
        assert status == "unavailable: not glibc"
        return
    assert status == "tuned"
    status, default = _faults("default")
    assert status == "default"
    # glibc's defaults map blocks this size afresh every step: their pages fault in again
    assert default > PAGES_PER_STEP, (tuned, default)
    assert tuned < PAGES_PER_STEP // 10, (tuned, default)  # tuned: the heap's blocks come back


@pytest.mark.parametrize("name, value", [("MALLOC_MMAP_THRESHOLD_", "1"), ("MALLOC_TRIM_THRESHOLD_", "1"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1"),
                                         ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_the_users_own_settings_stay(name, value):
    assert apply_cpu_malloc("tuned", environ={name: value}) == f"user: {name}"
    assert apply_cpu_malloc("default", environ={name: value}) == "default"
    with pytest.raises(ValueError):
        apply_cpu_malloc("jemalloc", environ={})


def test_a_preloaded_library_that_is_no_allocator_does_not_count():
    status = apply_cpu_malloc("tuned", environ={"LD_PRELOAD": "/opt/profiler/libtrace.so"})
    assert status in ("tuned", "unavailable: not glibc")


def test_the_trainer_and_load_run_apply_it_on_the_cpu(tmp_path, monkeypatch):
    from engine.config import load_config
    from engine.trainer import Trainer
    from tests.helpers import SUBSET
    overrides = ["model.levels=1", "model.steps=1", "model.hidden_channels=4", "train.batch_size=2",
                 "train.init_batch_size=2", "data.name=npz", f"data.path={SUBSET}", "data.max_train=8", "data.max_test=8"]
    for mode in ("default", "tuned"):
        cfg = load_config(os.path.join(ROOT, "experiments/glow_small.yaml"), overrides + [f"train.cpu_malloc={mode}"])
        (tmp_path / mode).mkdir()
        trainer = Trainer(cfg, str(tmp_path / mode), tensorboard=False)
        user = _user_setting(os.environ)
        expected = "default" if mode == "default" else (f"user: {user}" if user else
                                                          "tuned" if _is_glibc() else "unavailable: not glibc")
        assert trainer.cpu_malloc == expected
        trainer.save()
    # eval.py / sample.py load the run: its setting is applied on the CPU, not elsewhere
    import engine.run
    applied = []
    monkeypatch.setattr(engine.run, "apply_cpu_malloc", applied.append)
    engine.run.load_run(str(tmp_path / "default"), device="cpu")
    engine.run.load_run(str(tmp_path / "tuned"), device="meta")
    assert applied == ["default"]
