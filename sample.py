"""Draw a PNG grid of samples from a trained run, one row per temperature.

    python sample.py RUN_DIR --n 64 --temperature 0.7 [--temperature 1.0 ...] --out grid.png
    python sample.py model.safetensors --n 16 --out grid.png      # an exported (shared) model

RUN_DIR may also be a checkpoint file (best.pt).

The conditioner networks run in the run's precision (``train.mixed_precision``: bf16 autocast for a
run trained in bf16, as the trainer's own sample grids; the invertible stream stays float32);
``--precision fp32`` or ``bf16`` chooses.

Non-finite pixels are counted and reported (shown black), never silently clamped.
A run of another objective (nll, elbo, reverse_kl) draws what its trainer draws
(``objective.save_samples``: the 2-D density / samples figure, the VAE's Bernoulli means).
"""
import argparse
import dataclasses

import torch

from engine.cli import check_at_least, check_device, check_number, check_output_file, run_cli
from engine.images import save_grid, to_uint8
from engine.run import load_run
from engine.setup import load_data, make_objective


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="run directory, checkpoint file or exported model.safetensors")
    parser.add_argument("--n", type=int, default=64, help="images per temperature row")
    parser.add_argument("--temperature", type=float, action="append", help="repeatable; default 0.7")
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even if the run kept an EMA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("run", "fp32", "bf16"), default="run",
                        help="the conditioner networks' precision: the run's train.mixed_precision (default), or as given")
    args = parser.parse_args()
    temps = args.temperature or [0.7]
    check_at_least(args.n, 1, "--n")
    for temp in temps:
        check_number(temp, "--temperature", minimum=0.0)
    check_at_least(args.seed, 0, "--seed")
    check_device(args.device)
    from PIL import Image
    check_output_file(args.out, "--out", tuple(Image.registered_extensions()))
    cfg, model, info = load_run(args.run_dir, use_ema=not args.no_ema, device=args.device)
    bf16 = args.precision == "bf16" or (args.precision == "run" and cfg.train.mixed_precision == "bf16")
    precision = "bf16 autocast" if bf16 else "float32"
    torch.manual_seed(args.seed)
    with torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=bf16):
        if cfg.objective["name"] != "bpd":
            stem = args.out[:-4] if args.out.endswith(".png") else args.out
            sample_cfg = dataclasses.replace(cfg.sample, n=args.n, temperatures=tuple(temps))
            out = make_objective(cfg).save_samples(model, load_data(cfg), sample_cfg, stem)
            print(f"wrote {out['path']}: {args.n} samples at T={temps} (objective {cfg.objective['name']}, step "
                  f"{info['step']}, EMA {'on' if info['ema'] else 'off'}, {precision}); "
                  f"non-finite {out['nonfinite_what']}: {out['nonfinite']}")
            return
        rows, bad = [], 0
        for temp in temps:
            images, n_bad = to_uint8(model.sample(args.n, temperature=temp), cfg.data.n_bits)
            rows.append(images)
            bad += n_bad
    save_grid(rows, args.out)
    total = sum(r.numel() for r in rows)
    print(f"wrote {args.out}: {len(temps)} row(s) x {args.n} samples at T={temps} "
          f"(step {info['step']}, EMA {'on' if info['ema'] else 'off'}, {precision}); non-finite pixels: {bad} of {total}")


if __name__ == "__main__":
    run_cli(main)
