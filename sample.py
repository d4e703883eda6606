"""
Draw faces from a checkpoint written by train.py. The checkpoint alone rebuilds the model (EMA weights).

    python sample.py out/ckpt.pt                              # 64 faces -> samples.png
    python sample.py out/ckpt.pt --n 10000 --out-dir fid_gen  # numbered PNGs for FID tools
    python sample.py out/ckpt.pt --sampler ddpm               # 1000-step ancestral sampling
    python sample.py --bench --compile                        # images/s of 50-step DDIM, random weights
"""
import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torchvision

import unet
from diffusion import GaussianDiffusion
import data
from train import CheckpointError, load_checkpoint, pick_device, positive


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sample faces from a train.py checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", nargs="?", default=None, help="checkpoint path (out/ckpt.pt); not needed with --bench")
    p.add_argument("--n", type=positive(int), default=64, help="number of images")
    p.add_argument("--batch-size", type=positive(int), default=256, help="images per forward pass")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"], help="DDIM (few steps) or DDPM ancestral (all T steps)")
    p.add_argument("--steps", type=positive(int), default=50, help="DDIM steps (ignored by ddpm, which uses all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--var", default="beta", choices=["beta", "posterior"], help="DDPM sigma_t^2: beta_t or the posterior variance")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same faces")
    p.add_argument("--out", default="samples.png", help="grid PNG to write")
    p.add_argument("--out-dir", default=None, help="also write every image as a numbered PNG here (for pytorch-fid / clean-fid)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision; auto = bf16 on GPUs that support it, fp32 otherwise")
    p.add_argument("--compile", action="store_true", help="torch.compile the sampling step (CUDA graphs on GPU)")
    p.add_argument("--bench", action="store_true", help="time sampling with a randomly initialised model of --size")
    p.add_argument("--size", type=positive(int), default=64, help="image size for --bench (its preset model)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except (CheckpointError, data.DataError, OSError, ValueError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    device = pick_device(args.device)
    for folder in (os.path.dirname(args.out), args.out_dir):  # before sampling, so a bad path loses no work
        if folder:
            os.makedirs(folder, exist_ok=True)
    if args.eta < 0:
        raise ValueError(f"--eta {args.eta}: must be >= 0 (0 deterministic, 1 DDPM-like)")
    if args.precision == "auto":
        args.precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    torch.backends.cudnn.benchmark = True

    if args.bench:
        model, diffusion, size = unet.UNet(unet.preset(args.size)), GaussianDiffusion(), args.size
    else:
        if args.ckpt is None:
            raise CheckpointError("no checkpoint given; usage: python sample.py out/ckpt.pt")
        ckpt = load_checkpoint(args.ckpt)
        try:
            model = unet.build(ckpt["model_args"])
            model.load_state_dict(ckpt["ema"])  # always the EMA weights
            a = ckpt["args"]
            diffusion = GaussianDiffusion(a["timesteps"], a["schedule"], a["objective"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{args.ckpt} does not match this version of unet.py ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        size = model.cfg.image_size
        if args.sampler == "ddim" and args.steps > diffusion.T:
            raise ValueError(f"--steps {args.steps} is more than the model's T={diffusion.T}; use at most {diffusion.T}")
        print(f"loaded {args.ckpt}: step {ckpt['step']}, {model.num_params() / 1e6:.2f}M parameters, {size}x{size}, "
              f"T={diffusion.T} {diffusion.schedule} {diffusion.objective}")
    model = model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    diffusion.to(device)
    net = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default") if args.compile else model
    steps = diffusion.T if args.sampler == "ddpm" else args.steps
    print(f"device {device}, {args.precision}, {args.sampler} with {steps} steps" + (f", eta {args.eta}" if args.sampler == "ddim" else ""))

    gen = torch.Generator(device=device).manual_seed(args.seed)
    def draw(n):
        with ctx:
            x = diffusion.sample(net, (n, 3, size, size), args.sampler, args.steps, args.eta, gen, clip=not args.no_clip,
                                 var_type=args.var, device=device)
        return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()  # (n, 3, H, W) uint8

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.bench:
        draw(min(args.batch_size, 8) if not args.compile else args.batch_size)  # warm-up (and compilation)
        sync()
        t0 = time.time()
        draw(args.batch_size)
        sync()
        dt = time.time() - t0
        print(f"bench: {args.batch_size / dt:,.1f} images/s | {args.batch_size} images of {size}x{size} in {dt:.2f}s | "
              f"{args.sampler} {steps} steps | {dt / steps * 1e3:.1f} ms per step")
        return

    images, t0, done = [], time.time(), 0
    while done < args.n:
        x = draw(min(args.batch_size, args.n - done))
        if args.out_dir:
            for i, img in enumerate(x):
                torchvision.io.write_png(img, os.path.join(args.out_dir, f"{done + i:06d}.png"))
        if len(images) * args.batch_size < 1024:  # the grid shows the first images only
            images.append(x)
        done += len(x)
        print(f"{done}/{args.n} images | {done / (time.time() - t0):,.2f} images/s")
    grid = torch.cat(images)[: min(args.n, 1024)]
    torchvision.utils.save_image(grid.float() / 255, args.out, nrow=int(math.sqrt(len(grid)) + 0.5) if len(grid) > 8 else len(grid))
    print(f"wrote {args.out}" + (f" and {args.n} PNGs in {args.out_dir}" if args.out_dir else ""))


if __name__ == "__main__":
    main()
