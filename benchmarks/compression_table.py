"""Lossless compression of a run's test images: the IDF's rANS code against standard codecs.

    python benchmarks/compression_table.py RUN_DIR [--split test] [--max N] [--chunk 16] [--json FILE]

Prints a markdown table like IDF's Table 3: bits/dim and compression ratio (8 / bpd) of
the model's -log2 P(x) / D, of the actual IDF file (header included, decoded and checked
bit-exact), and of PNG, lossless WebP, lossless JPEG 2000 and lossless JPEG XL, each
image coded on its own through the reference libraries (imagecodecs).  Encode and decode
speeds are images per second on this machine's CPU (float64 model, one process).
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ""):  # run as a file: this checkout first (an editable install may point at another)
    sys.path.insert(0, ROOT)

import numpy as np
import torch

from compression.baselines import available_codecs, codec_bits
from compression.codec import FlowCodec
from engine.cli import run_cli
from common.errors import FlowlabError
from engine.run import load_run
from engine.setup import load_data


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def compression_rows(run_dir: str, split: str, max_images: int | None, chunk: int) -> tuple[list[dict], dict]:
    cfg, model, info = load_run(run_dir)
    images = getattr(load_data(cfg), split).numpy()
    images = images[:max_images] if max_images else images
    n, dims = images.shape[0], images.size
    codec = FlowCodec(model, cfg.data.n_bits, chunk)
    result, enc_s = _timed(codec.encode, images)
    decoded, dec_s = _timed(codec.decode, result.blob)
    if not np.array_equal(decoded, images):
        raise FlowlabError("IDF round trip is not bit-exact")
    rows = [
        {"codec": "IDF model -log2 P(x)/D", "bpd": float(result.model_bits.sum() / dims)},
        {"codec": "IDF + rANS (actual file)", "bpd": result.coded_bits / dims, "encode_img_s": n / enc_s,
         "decode_img_s": n / dec_s, "bytes": len(result.blob), "payload_bpd": result.payload_bits / dims},
    ]
    for name in available_codecs():
        bits, seconds = _timed(codec_bits, name, images)
        rows.append({"codec": name, "bpd": bits / dims, "encode_img_s": n / seconds})  # encode + decode check
    meta = {"run": run_dir, "split": split, "images": n, "step": info["step"], "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads()}
    return rows, meta


def table(rows: list[dict]) -> str:
    lines = ["| codec | bits/dim | ratio | encode img/s | decode img/s |", "|---|---|---|---|---|"]
    for r in rows:
        enc = f"{r['encode_img_s']:.1f}" if "encode_img_s" in r else "–"
        dec = f"{r['decode_img_s']:.1f}" if "decode_img_s" in r else "–"
        lines.append(f"| {r['codec']} | {r['bpd']:.3f} | {8 / r['bpd']:.2f}x | {enc} | {dec} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--max", type=int, default=None, help="only the first N images")
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    rows, meta = compression_rows(args.run_dir, args.split, args.max, args.chunk)
    print(f"{meta['images']} {args.split} images of {meta['run']} (step {meta['step']}, {meta['params']:,} parameters, "
          f"{meta['threads']} thread(s)); baselines: speed includes the decode check")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    run_cli(main)
