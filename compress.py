"""Losslessly compress images with a trained integer flow (IDF) into one file.

    python compress.py RUN_DIR IMAGES... --out FILE.flic      # PNG files, .npy or .npz (x_test) arrays
    python compress.py RUN_DIR --split test --out FILE.flic    # the run's own test images

RUN_DIR may also be an exported model.safetensors or a checkpoint file.  Image files must be
what the model codes exactly (its channels and size, 8-bit, no alpha): anything else is
refused, and "verified" compares the decoded images with the input files' own pixels.

Prints the model's -log2 P(x) / D next to the bits/dim actually written (payload and
whole file), and, unless --no-verify, decodes the file again and checks every image.
"""
import argparse
import json
import time

import numpy as np

from compression.codec import FlowCodec
from compression.image_files import matches_files, read_images
from engine.cli import check_at_least, check_output_file, run_cli
from common.errors import FlowlabError
from engine.run import load_run
from engine.setup import load_data


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("images", nargs="*", help="image files (.png, ...), .npy or .npz arrays")
    p.add_argument("--split", choices=["test", "train"], help="compress the run's own data split instead")
    p.add_argument("--max", type=int, default=None, help="only the first N images")
    p.add_argument("--out", required=True)
    p.add_argument("--chunk", type=int, default=16, help="images per model batch (stored in the file)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--no-verify", action="store_true")
    args = p.parse_args()
    if bool(args.images) == bool(args.split):
        raise FlowlabError("give either image files or --split, not both or neither")
    check_at_least(args.max, 1, "--max")
    check_output_file(args.out, "--out")
    cfg, model, _ = load_run(args.run_dir, use_ema=not args.no_ema)
    if args.images:
        images = read_images(args.images, shape=tuple(model.data_shape), num_bits=cfg.data.n_bits)
    else:
        images = getattr(load_data(cfg), args.split).numpy()
    images = images[: args.max] if args.max else images
    codec = FlowCodec(model, cfg.data.n_bits, args.chunk)
    dims = images.size
    t0 = time.perf_counter()
    result = codec.encode(images)
    encode_s = time.perf_counter() - t0
    with open(args.out, "wb") as f:
        f.write(result.blob)
    report = {"images": int(images.shape[0]), "file": args.out, "bytes": len(result.blob),
              "model_bpd": float(result.model_bits.sum() / dims), "coded_bpd": result.coded_bits / dims,
              "payload_bpd": result.payload_bits / dims, "encode_img_per_s": images.shape[0] / encode_s}
    if not args.no_verify:
        t0 = time.perf_counter()
        decoded = codec.decode(result.blob)
        report["decode_img_per_s"] = images.shape[0] / (time.perf_counter() - t0)
        if not np.array_equal(decoded, images) or (args.images and not matches_files(
                decoded, args.images, shape=tuple(model.data_shape))):
            raise FlowlabError("verification failed: decoded images differ from the input")
        report["verified"] = True
    print(json.dumps(report))


if __name__ == "__main__":
    run_cli(main)
