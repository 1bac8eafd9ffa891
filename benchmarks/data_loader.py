"""Memory of a 2-process loader run over a prepared data set, in memory vs memory-mapped, and
the loader's images/s alone; prints one JSON line per measurement and a markdown table.

    python -m data.prepare random --out /tmp/imagenet32_size --count 1281167 --test-count 50000 --shape 3 32 32
    python benchmarks/data_loader.py /tmp/imagenet32_size [--batch-size 256] [--epochs 3] [--speed-batches 2000]

Two spawned processes (rank 0 and 1 of world 2) each draw their shard of every global batch
(``data.ShardedBatches``, as the trainer does) for ``--epochs`` epochs of the train split:

    after  (memmap)     images = load_dataset("prepared", path=DIR).train, batches gathered from the map
    before (in memory)  images = the whole train array read into the process (what every loader
                        did before prepared sets: one copy per process), batches gathered from it

Memory per process from ``/proc/self/smaps_rollup`` at the end of each phase (both processes
wait for each other first), minus the same figures before it: USS = Private_Clean +
Private_Dirty (pages only this process maps), PSS (shared pages split among the processes
mapping them), RSS (counts shared file pages in full), Anonymous (the process's own copies).
A file page that only one process has touched so far counts as its USS, so the memmap
phase runs several epochs (each rank sees most images). Figures depend on the machine and
its load.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, ROOT)
FIELDS = {"Rss": "rss", "Pss": "pss", "Private_Clean": "private_clean", "Private_Dirty": "private_dirty",
          "Anonymous": "anonymous"}


def memory(pid: str | int = "self") -> dict:
    """{rss, pss, uss, anonymous} of a process in bytes, from /proc/PID/smaps_rollup (Linux)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in FIELDS:
                out[FIELDS[key]] = int(rest.split()[0]) * 1024
    out["uss"] = out.pop("private_clean") + out.pop("private_dirty")
    return out


def _grown(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def _iterate(images, rank: int, world: int, batch_size: int, epochs: int) -> int:
    """Draw this rank's batches of ``epochs`` epochs; a checksum so nothing is optimised away."""
    from data import ShardedBatches

    batches = ShardedBatches(images.shape[0], batch_size, seed=0, rank=rank, world_size=world)
    total = 0
    for step in range(batches.steps_per_epoch * epochs):
        total += int(images[batches.indices(step)][:, 0, 0, 0].sum())
    return total


def loader_worker(path: str, rank: int, world: int, batch_size: int, epochs: int, barrier, queue) -> None:
    """One process of the 2-process run: the memmap phase, then the in-memory phase."""
    import numpy as np
    import torch

    from data import load_dataset

    torch.set_num_threads(1)
    mapped = load_dataset("prepared", path=path).train
    barrier.wait()
    m0 = memory()
    checksum = _iterate(mapped, rank, world, batch_size, epochs)
    barrier.wait()  # both have mapped what they read before either measures
    m1 = memory()
    barrier.wait()
    in_memory = torch.from_numpy(np.load(os.path.join(path, "train.npy")))  # a private copy, as before
    assert _iterate(in_memory, rank, world, batch_size, epochs) == checksum
    barrier.wait()
    m2 = memory()
    queue.put({"rank": rank, "file_bytes": int(in_memory.numel()), "memmap": _grown(m1, m0),
               "in_memory": _grown(m2, m1)})


def two_process_memory(path: str, batch_size: int = 256, epochs: int = 3, timeout: float = 600) -> list[dict]:
    """Per-rank memory growth of the two phases (see the module docstring), rank order."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=loader_worker, args=(path, r, 2, batch_size, epochs, barrier, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return sorted(results, key=lambda r: r["rank"])


def loader_speed(path: str, batch_size: int = 256, batches: int = 2000) -> dict:
    """Images/s of gathering shuffled batches from the mapped train split (one process, warm cache)."""
    from data import ShardedBatches, load_dataset

    images = load_dataset("prepared", path=path).train
    sb = ShardedBatches(images.shape[0], batch_size, seed=0)
    for step in range(min(50, batches)):  # warm-up
        images[sb.indices(step)]
    start = time.perf_counter()
    for step in range(batches):
        images[sb.indices(step)]
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "batches": batches, "seconds": seconds,
            "images_per_s": batches * batch_size / seconds, "batches_per_s": batches / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a prepared data set directory (python -m data.prepare ... --out DIR)")
    p.add_argument("--batch-size", type=int, default=256, help="global batch of the 2-process run and of the speed run")
    p.add_argument("--epochs", type=int, default=3, help="epochs each process draws in each phase")
    p.add_argument("--speed-batches", type=int, default=2000, help="batches of the images/s measurement")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    speed = loader_speed(args.path, args.batch_size, args.speed_batches)
    print(json.dumps({"loader": speed}), flush=True)
    t0 = time.perf_counter()
    ranks = two_process_memory(args.path, args.batch_size, args.epochs)
    for r in ranks:
        print(json.dumps(r), flush=True)
    gib = 2**30
    print(f"\n{ranks[0]['file_bytes'] / gib:.2f} GiB train split, 2 processes x {args.epochs} epochs of batch "
          f"{args.batch_size} ({time.perf_counter() - t0:.0f} s); growth per process, GiB:\n")
    print("| phase | rank | USS | PSS | RSS | Anonymous |\n|---|---|---|---|---|---|")
    for phase in ("in_memory", "memmap"):
        for r in ranks:
            m = r[phase]
            print(f"| {phase} | {r['rank']} | {m['uss'] / gib:.2f} | {m['pss'] / gib:.2f} | {m['rss'] / gib:.2f} | "
                  f"{m['anonymous'] / gib:.2f} |")
    print(f"\nloader alone: {speed['images_per_s']:,.0f} images/s ({speed['batches_per_s']:,.0f} batches/s of "
          f"{args.batch_size}, one process, warm page cache)")


if __name__ == "__main__":
    main()
