"""A stand-in refbench (``_common.py`` + ``ref_idf.py``) and reference checkout, for the tests of the
benchmarks that run a reference's harness in-process (``profile_reference.py``, ``flop_floor.py``):
no reference code needed.  The checkout's top-level package is ``models``, as IDF's, so a test also
sees that the harness imports the reference's ``models`` and not flowlab's.  Its ``_common.run``
fails: a benchmark must replace the timing loop."""
from __future__ import annotations

COMMON = '''
import argparse, os, sys
import torch
def get_args(name):
    p = argparse.ArgumentParser()
    for a, d in (("--ref-dir", None), ("--config", "small"), ("--batch", 16), ("--threads", 2), ("--seed", 0)):
        p.add_argument(a, default=d, type=type(d) if d is not None else str)
    a = p.parse_args()
    sys.path.insert(0, a.ref_dir)
    return a
def load_data():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    return x, x[:16]
def batches(x, bs, seed=0):
    while True:
        for i in range(0, len(x) - bs + 1, bs):
            yield x[i:i + bs]
def run(*args, **kwargs):
    raise SystemExit("the real timing loop must not run")
'''

# one 3x3 convolution 3 -> 8 channels on 8x8 images: 2 * 8*8 * 8 * 3*3*3 FLOPs per image forward
HARNESS = '''
import torch
from _common import get_args, run
args = get_args("integer_discrete_flows")
from models.Model import Net   # the reference's own ``models``, not flowlab's
model = Net()
opt = torch.optim.Adam(model.parameters())
def train_step(x):
    loss = model(x.float() / 255).pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad()
    return loss.item()
def sample(n):
    return model(torch.zeros(n, 3, 8, 8))
run("stand-in IDF", args, model, train_step, sample=sample)
'''
CONV_FLOPS_PER_IMAGE = 2 * 8 * 8 * 8 * 3 * 3 * 3


def write_fake_refbench(tmp_path):
    """(refbench folder, refs folder) of the stand-in, under ``tmp_path``."""
    bench, refs = tmp_path / "refbench", tmp_path / "refs"
    bench.mkdir()
    (bench / "_common.py").write_text(COMMON)
    (bench / "ref_idf.py").write_text(HARNESS)
    pkg = refs / "integer_discrete_flows" / "models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "Model.py").write_text("import torch\nclass Net(torch.nn.Sequential):\n"
                                  "    def __init__(self):\n        super().__init__(torch.nn.Conv2d(3, 8, 3, padding=1))\n")
    return bench, refs
