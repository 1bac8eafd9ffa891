"""Decode a file written by compress.py back to PNG images (and one .npy array).

    python decompress.py FILE.flic --run RUN_DIR --out DIR

The run must be the one that encoded the file (its weights' fingerprint is checked);
a corrupt, truncated or mismatched file is a one-line error, never a wrong image.
"""
import argparse
import json
import os
import time

import numpy as np

from compression.codec import FlowCodec
from compression.image_files import write_pngs
from engine.cli import run_cli
from common.errors import FlowlabError
from engine.run import load_run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--run", required=True, help="the run directory whose model encoded the file")
    p.add_argument("--out", required=True, help="directory for 00000.png ... and images.npy")
    p.add_argument("--no-ema", action="store_true")
    args = p.parse_args()
    if not os.path.isfile(args.file):
        raise FlowlabError(f"file not found: {args.file}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise FlowlabError(f"--out {args.out} is a file; give a directory")
    cfg, model, _ = load_run(args.run, use_ema=not args.no_ema)
    with open(args.file, "rb") as f:
        blob = f.read()
    t0 = time.perf_counter()
    images = FlowCodec(model, cfg.data.n_bits).decode(blob)
    seconds = time.perf_counter() - t0
    write_pngs(images, args.out)
    np.save(os.path.join(args.out, "images.npy"), images)
    print(json.dumps({"images": int(images.shape[0]), "out": args.out, "decode_img_per_s": images.shape[0] / seconds}))


if __name__ == "__main__":
    run_cli(main)
