"""
Draw faces from a checkpoint written by train.py. The checkpoint alone rebuilds the model (EMA weights).

    python sample.py out/ckpt.pt                              # 64 faces -> samples.png
    python sample.py out/ckpt.pt --n 10000 --out-dir fid_gen  # numbered PNGs for FID tools
    python sample.py out/ckpt.pt --sampler ddpm               # 1000-step ancestral sampling
    python sample.py --bench --compile                        # images/s of the default sampler, random weights

The core comes first: load the checkpoint -> draw -> write. Then one function per other mode (compare,
interpolate, bench, the figures), the flags and their checks, checkpoints and devices; the drawing of
the figures comes last.
"""
import argparse
import contextlib
import csv
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torchvision
from PIL import Image, ImageDraw
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import data
import unet
from data import USER_ERRORS, UsageError, atomic_write, check_writable, positive, real, random_seed, to_uint8
from diffusion import DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, SCHEDULES, GaussianDiffusion, guided, slerp

CKPT_FORMAT = "ddpm-faces-checkpoint-v1"
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance weight: the largest measured whose face quality stays within 10% (REPORT sec. 6)
REPAINT_STEPS = 250  # RePaint's face setting: 250 steps, jump length 10, 10 resamplings
# the flags that apply to some samplers only ("repaint" is --mask's): given to another, they are an error, not ignored
SAMPLER_FLAGS = {"eta": ("ddim",), "var": ("ddpm",), "spacing": ("dpm++", "dpm++sde"), "steps": ("ddim", "dpm++", "dpm++sde", "repaint")}
FIGURES = ("forward", "reverse", "attention", "schedules", "loss")
FORWARD_T = (0, 50, 100, 250, 500, 750, 999)  # the forward strip's timesteps at T = 1000 (scaled for other T)
# --mask regions as (top, bottom, left, right) fractions of the image, filled in by the model; eyes and mouth are placed
# for aligned CelebA faces, under the DDIM crop and the whole frame alike
MASKS = dict(center=(0.25, 0.75, 0.25, 0.75), top=(0, 0.5, 0, 1), bottom=(0.5, 1, 0, 1), left=(0, 1, 0, 0.5),
             right=(0, 1, 0.5, 1), eyes=(0.33, 0.57, 0.15, 0.85), mouth=(0.62, 0.84, 0.28, 0.72))
# --figure attention's query positions, (y, x) fractions of an aligned CelebA face, as MASKS places the eyes and mouth
QUERIES = dict(eye=(0.45, 0.36), mouth=(0.73, 0.5), background=(0.06, 0.06))


class CheckpointError(Exception):
    """A missing, corrupt, unsafe or foreign checkpoint, or one whose parts do not fit together."""


ERRORS = (*USER_ERRORS, CheckpointError)  # printed as one line, with exit code 2

# -----------------------------------------------------------------------------
# the core: checkpoint -> images


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except ERRORS as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def run(args):
    device = pick_device(args.device)
    check_flags(args)  # everything that can be checked before any work
    precision, ctx = autocast(device, args.precision)
    torch.backends.cudnn.benchmark = True
    if args.figure in ("schedules", "loss"):  # no model needed
        return figure_schedules(args) if args.figure == "schedules" else figure_loss(args)
    job = load(args, device, ctx)
    describe(job, precision)
    if args.bench:
        return bench(job)
    if args.figure:
        return {"forward": figure_forward, "reverse": figure_reverse, "attention": figure_attention}[args.figure](job)
    if args.interpolate:
        return interpolate(job)
    if args.compare:
        return compare(job)
    # plain sampling, SDEdit of --init and RePaint of --init's hole alike: batch after batch, PNGs as they come
    images, t0, done = [] if job.x_init is None else [to_uint8(job.x_init if job.mask is None else job.x_init * job.mask)], time.time(), 0
    while done < args.n:  # the grid starts with the --init image (its hole grey with --mask); the PNGs are the samples
        x = draw(job, min(args.batch_size, args.n - done))
        if len(images) * args.batch_size < 1024:  # the grid shows the first images only
            images.append(x)
        write_images(args, [x], first=done, grid=False)
        done += len(x)
        print(f"{done}/{args.n} images | {done / (time.time() - t0):,.2f} images/s")
    write_images(args, images, pngs=False)


@dataclass
class Job:
    """Everything a draw needs, resolved from the flags and the checkpoint."""
    args: argparse.Namespace
    model: torch.nn.Module  # the EMA weights, in eval mode (compiled with --compile)
    diffusion: GaussianDiffusion
    attr_names: tuple  # the model's attributes; () for an unconditional model
    size: int
    device: torch.device
    ctx: object  # the autocast context
    generator: torch.Generator
    cond: torch.Tensor = None  # (K,) in {+1 present, -1 absent, 0 free}, or None: the unconditional path
    x_init: torch.Tensor = None  # (1, 3, size, size) in [-1, 1]: the image that SDEdit edits or RePaint fills in
    mask: torch.Tensor = None  # (1, 1, size, size): 1 where --init is kept


def load(args, device, ctx):
    """The checkpoint's EMA model (a random preset model for --bench), the condition, --init and --mask -> Job."""
    if args.bench:
        model, diffusion = unet.UNet(unet.preset(args.size)), GaussianDiffusion()
    else:
        ckpt = load_checkpoint(args.ckpt)
        model, diffusion = model_from_checkpoint(ckpt, args.ckpt)
        print(f"loaded {args.ckpt}: step {ckpt['step']}, {model.num_params() / 1e6:.2f}M parameters, {model.cfg.image_size}x"
              f"{model.cfg.image_size}, T={diffusion.T} {diffusion.schedule} {diffusion.objective}")
    size = model.cfg.image_size
    if (args.steps or 0) > diffusion.T:
        raise UsageError(f"--steps {args.steps} is more than the model's T={diffusion.T}; use at most {diffusion.T}")
    args.steps = args.steps or min(REPAINT_STEPS if args.mask else DEFAULT_STEPS, diffusion.T)
    cond = parse_attrs(args, model.cfg.attrs)
    x_init = load_image(args, size, device) if args.init else None
    mask = load_mask(args, size, device) if args.mask else None
    model = model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    net = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default") if args.compile else model
    return Job(args, net, diffusion.to(device), tuple(model.cfg.attrs), size, device, ctx,
               torch.Generator(device=device).manual_seed(args.seed), cond, x_init, mask)


def draw(job, n, x_T=None, cond=..., callback=None):
    """n images (n, 3, H, W) uint8 from x_T (default: fresh noise from the job's generator): plain sampling, SDEdit
    of --init, or RePaint of --init's hole, guided toward `cond` (default: the job's). callback(t, x_t, x0_hat)
    sees every step of plain sampling."""
    args, diffusion, cond = job.args, job.diffusion, job.cond if cond is ... else cond
    if x_T is None:
        x_T = torch.randn((n, 3, job.size, job.size), generator=job.generator, device=job.device)  # the start noise
    model = job.model if cond is None else guided(job.model, cond.to(job.device), args.guidance)  # both halves in one batch
    kw = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, generator=job.generator, clip=not args.no_clip,
              var_type=args.var, spacing=args.spacing)
    with job.ctx:
        if job.mask is not None:  # every image fills in the same --init from its own noise
            x = diffusion.repaint(model, x_T, job.x_init.expand(n, -1, -1, -1), job.mask, args.steps, args.jump_length,
                                  args.jump_n_sample, job.generator, not args.no_clip)
        elif job.x_init is not None:  # every image edits the same --init from its own noise
            x = diffusion.sdedit(model, job.x_init.expand(n, -1, -1, -1), args.strength, x_T, **kw)
        else:
            x = diffusion.sample(model, x_T.shape, x_T=x_T, callback=callback, **kw)
    return to_uint8(x)


def write_images(args, batches, first=0, grid=True, pngs=True, nrow=None):
    """The numbered PNGs in --out-dir (from number `first`), and/or the grid --out of the first 1,024 images."""
    x = torch.cat(batches)
    n_pngs = len(x) if pngs else args.n
    if pngs and args.out_dir:
        for i, img in enumerate(x):
            atomic_write(lambda tmp: torchvision.io.write_png(img, tmp), os.path.join(args.out_dir, f"{first + i:06d}.png"), "--out-dir")
    if grid:
        x = x[:1024]
        nrow = nrow or (int(math.sqrt(len(x)) + 0.5) if len(x) > 8 else len(x))
        fmt = Image.registered_extensions()[os.path.splitext(args.out)[1].lower()]  # the temporary name has no extension
        atomic_write(lambda tmp: torchvision.utils.save_image(x.float() / 255, tmp, format=fmt, nrow=nrow), args.out, "--out")
        print(f"wrote {args.out}" + (f" and {n_pngs} PNGs in {args.out_dir}" if args.out_dir else ""))

# -----------------------------------------------------------------------------
# the other modes


def compare(job):
    """--compare NAME: every face with NAME absent (top row) and present (bottom row), from the same x_T and, the
    generator re-seeded, the same noise at every step."""
    args, k, halves = job.args, job.attr_names.index(job.args.compare), []
    x_T = torch.randn((args.n, 3, job.size, job.size), generator=job.generator, device=job.device)
    for value in (-1.0, 1.0):
        job.generator.manual_seed(args.seed + 1)
        halves.append(draw(job, args.n, x_T, job.cond.index_fill(0, torch.tensor([k]), value)))
    write_images(args, halves, nrow=args.n)


def interpolate(job):
    """--interpolate N: a strip from --seed's own sample (the same x_T) to --seed + 1's, the noises slerped."""
    args = job.args
    z = [torch.randn((1, 3, job.size, job.size), generator=torch.Generator(device=job.device).manual_seed(s), device=job.device)
         for s in (args.seed, args.seed + 1)]
    write_images(args, [draw(job, args.interpolate, slerp(z[0], z[1], torch.linspace(0, 1, args.interpolate)))], nrow=args.interpolate)


def bench(job):
    """Images/s of the chosen sampler. The warm-up runs the timed batch size through a 2-step chain, so that
    compilation, CUDA graphs and cuDNN's autotuning for these shapes all happen before the clock starts."""
    args, steps = job.args, len(job.diffusion.timesteps(job.args.sampler, job.args.steps, job.args.spacing))
    timed_steps, args.steps = args.steps, min(args.steps, 2)
    draw(job, args.batch_size)  # warm-up
    args.steps = timed_steps
    synchronize(job.device)
    t0 = time.time()
    draw(job, args.batch_size)
    synchronize(job.device)
    dt = time.time() - t0
    print(f"bench: {args.batch_size / dt:,.1f} images/s | {args.batch_size} images of {job.size}x{job.size} in {dt:.2f}s | "
          f"{args.sampler} {steps} steps | {dt / steps * 1e3:.1f} ms per step")


def describe(job, precision):
    """The one line that says what will be drawn, and how."""
    args, diffusion = job.args, job.diffusion
    if args.mask:
        path = diffusion.repaint_path(args.steps, args.jump_length, args.jump_n_sample)
        n = sum(q < p for p, q in zip(path, path[1:]))  # each step down is one model evaluation
        how = (f"RePaint inpainting of {args.init} ({args.mask}) with {args.steps} steps, jump length {args.jump_length}, "
               f"{args.jump_n_sample} passes: {n} model evaluations per image")
    else:
        how = f"{args.sampler} with {len(diffusion.timesteps(args.sampler, args.steps, args.spacing))} steps"
        how += f", eta {args.eta}" if args.sampler == "ddim" else ""
        how += f"; SDEdit of {args.init} from t = {round(args.strength * diffusion.T)} of {diffusion.T}" if args.strength is not None else ""
    if job.cond is not None:
        asked = [a for a in (args.attrs, args.compare and f"{args.compare}=0|1") if a]
        how += f"; {' and '.join(asked)} with guidance {args.guidance:g}"
    print(f"device {job.device}, {precision}, {how}")

# -----------------------------------------------------------------------------
# flags, and the checks that run before any work


def get_args(argv=None):
    p = data.Parser(description="Sample faces from a train.py checkpoint.")
    p.add_argument("ckpt", nargs="?", default=None, help="checkpoint path (out/ckpt.pt, or the out folder); not needed with --bench")
    p.add_argument("--n", type=positive(int), default=None, help="number of images (default: 64; with --figure reverse, 8, its most)")
    p.add_argument("--batch-size", type=positive(int), default=256, help="images per forward pass")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help=f"DDIM, DPM-Solver++(2M) (second-order ODE solver), SDE-DPM-Solver++(2M) (its stochastic twin) or DDPM "
                        f"ancestral (all T steps) (default: {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=positive(int), default=None,
                   help=f"model evaluations for ddim and dpm++ (ddpm uses all T); with --mask, RePaint's steps down the sub-sequence "
                        f"(default: {DEFAULT_STEPS}, with --mask {REPAINT_STEPS})")
    p.add_argument("--spacing", default=None, choices=["logsnr", "time"],
                   help="dpm++ and dpm++sde time steps: uniform in log-SNR or in t (default: logsnr)")
    p.add_argument("--eta", type=real, default=None, help=f"DDIM eta: 0 deterministic, 1 DDPM-like noise (default: {DEFAULT_ETA:g})")
    p.add_argument("--var", default=None, choices=["beta", "posterior"],
                   help="ddpm's sigma_t^2: beta_t or the posterior variance (default: beta)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--seed", type=random_seed, default=0, help="random seed: the same seed gives the same faces")
    p.add_argument("--out", default="samples.png", help="grid image to write (.png, .jpg, .webp, ...)")
    p.add_argument("--out-dir", default=None, help="also write every image as a numbered PNG here (for pytorch-fid / clean-fid)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision; auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU/MPS")
    p.add_argument("--compile", action="store_true", help="torch.compile the sampling step (CUDA graphs on GPU)")
    p.add_argument("--init", default=None, help="SDEdit: edit this image (cropped and resized as in training) instead of sampling from noise")
    p.add_argument("--strength", type=real, default=None, help="SDEdit: noise --init to t = strength * T, then denoise; in [0, 1] "
                   "(0 returns the image, 1 ignores it; default 0.5, the SDEdit paper's range)")
    p.add_argument("--crop", default="auto", choices=data.CROPS, help="how --init is cropped, as train.py's --crop")
    p.add_argument("--interpolate", type=positive(int), default=None, metavar="FRAMES",
                   help="a strip of FRAMES faces from --seed's starting noise to --seed + 1's (spherical interpolation), "
                        "with a deterministic sampler (DDIM eta 0 unless --sampler dpm++)")
    p.add_argument("--attrs", default=None, metavar="NAME=0|1,...",
                   help="ask a model trained with --attrs for attributes, e.g. 'Smiling=1,Eyeglasses=0' (1 present, 0 absent); "
                        "the others are left free")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="ask for attributes in plain words, e.g. 'a smiling blond woman with glasses, no hat': a parser over "
                        "CelebA's 40 attribute names and their common phrasings, with negation (no, not, without); it prints "
                        "what it understood and what it ignored (instead of --attrs)")
    p.add_argument("--guidance", type=real, default=None,
                   help=f"classifier-free guidance weight W for --attrs/--compare: 1 the conditional model alone, larger follows the "
                        f"attributes more strictly at some cost in variety (default: {DEFAULT_GUIDANCE:g})")
    p.add_argument("--compare", default=None, metavar="NAME",
                   help="side by side: every face with attribute NAME absent (top row) and present (bottom row), from the same noise")
    p.add_argument("--mask", default=None, metavar="REGION|MASK.png",
                   help=f"inpaint --init with RePaint: the model fills in {', '.join(MASKS)}, or the white pixels of a mask image "
                        "(cropped and resized like --init)")
    p.add_argument("--jump-length", type=positive(int), default=None, help="RePaint: steps the chain goes back up per resampling (default: 10)")
    p.add_argument("--jump-n-sample", type=positive(int), default=None,
                   help="RePaint: passes over each jump, so 1 is no resampling (default: 10)")
    p.add_argument("--figure", default=None, choices=FIGURES,
                   help="instead of samples, write a figure to --out: forward (one face noised under each schedule; the face is "
                        "--init or the model's own), reverse (x_t and predicted x0 along the sampler for up to 8 faces, and a GIF "
                        "of every step beside --out), attention (where the self-attention of an eye, the mouth and the "
                        "background looks, at four t), schedules (alpha_bar and log-SNR against t), loss (the run's log.csv)")
    p.add_argument("--bench", action="store_true", help="time sampling with a randomly initialised model of --size")
    p.add_argument("--size", type=positive(int), default=None, help="image size for --bench, whose preset model it times (default: 64)")
    return p.parse_args(argv)


def check_flags(args):
    """Flags that do not fit together, or values out of range: one line each, before any work. Fills in the
    defaults that depend on the mode (the sampler, its steps and eta, SDEdit's strength, RePaint's jumps, W)."""
    check_modes(args)
    sampler = "repaint" if args.mask is not None else args.sampler or DEFAULT_SAMPLER
    for flag, samplers in SAMPLER_FLAGS.items():
        if getattr(args, flag) is not None and sampler not in samplers:
            raise UsageError(f"--{flag} does not apply to {'RePaint (--mask)' if sampler == 'repaint' else '--sampler ' + sampler} "
                             f"(only to {', '.join(samplers)}); drop --{flag}" + (": ddpm takes all T steps; for fewer stochastic steps "
                             "use --sampler ddim --eta 1" if flag == "steps" else ""))
    args.sampler, args.var, args.spacing = args.sampler or DEFAULT_SAMPLER, args.var or "beta", args.spacing or "logsnr"
    args.eta = DEFAULT_ETA if args.eta is None else args.eta
    if args.mask is not None:  # --steps: the sampler's default (RePaint's with --mask), or T if less, once T is known
        args.jump_length, args.jump_n_sample = args.jump_length or 10, args.jump_n_sample or 10
    if args.init is not None and args.mask is None and not args.figure:
        args.strength = 0.5 if args.strength is None else args.strength
    args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    args.n = args.n or (8 if args.figure == "reverse" else 64)
    if args.bench:
        args.size = args.size or 64
    check_values(args)
    if args.interpolate and args.sampler == "ddim" and args.eta != 0:
        print("--interpolate: DDIM with eta 0, so that every frame is a function of its starting noise alone")
        args.eta = 0.0
    check_outputs(args)


def check_modes(args):
    """The modes (--figure, --bench, --interpolate, --compare, --init with --strength or --mask) that do not go together."""
    repaint = [f for f in ("jump_length", "jump_n_sample") if getattr(args, f) is not None]
    if args.figure and (args.interpolate or args.compare or args.mask or args.strength is not None or args.bench):
        raise UsageError("--figure draws one figure; drop --interpolate, --compare, --mask, --strength and --bench")
    if args.figure and args.init is not None and args.figure != "forward":
        raise UsageError(f"--init is the face of --figure forward; --figure {args.figure} draws its own")
    if args.size is not None and not args.bench:
        raise UsageError("--size sets the model that --bench times; a checkpoint has its own size: drop --size")
    if args.ckpt is None and not args.bench and args.figure not in ("schedules", "loss"):  # loss names what it needs
        raise UsageError("no checkpoint given; usage: python sample.py out/ckpt.pt")
    if (args.strength is not None or args.mask is not None) and args.init is None:
        raise UsageError(f"{'--mask' if args.mask is not None else '--strength'} edits an image: give the image with --init IMAGE")
    if repaint and args.mask is None:
        raise UsageError(f"--{repaint[0].replace('_', '-')} sets RePaint's resampling, which inpaints: add --init IMAGE --mask REGION")
    if args.mask is not None and args.strength is not None:
        raise UsageError("--mask (inpainting) and --strength (SDEdit) do not go together; use one of them")
    if args.mask is not None and args.sampler is not None:
        raise UsageError(f"--mask samples with RePaint's own ancestral steps, not --sampler {args.sampler}; drop --sampler")
    if args.prompt is not None and args.attrs is not None:
        raise UsageError("--prompt and --attrs both ask for attributes; use one of them")
    if args.guidance is not None and args.attrs is None and args.compare is None and args.prompt is None:
        raise UsageError("--guidance weighs the attributes asked for: add --attrs NAME=1 (or --prompt TEXT, or --compare NAME)")
    if args.interpolate and (args.init is not None or args.compare is not None):
        raise UsageError(f"--interpolate and {'--init' if args.init is not None else '--compare'} do not go together; use one of them")
    if args.interpolate and args.sampler in ("ddpm", "dpm++sde"):
        raise UsageError(f"--interpolate needs a deterministic sampler, and {args.sampler} adds noise: use --sampler ddim or dpm++")


def check_values(args):
    """Each value in its range, each file there."""
    if not 0 <= args.eta <= 1:
        raise UsageError(f"--eta {args.eta:g}: must be in [0, 1] (0 deterministic, 1 DDPM-like); above 1 DDIM would add more "
                         "noise per step than the chain can take, and every pixel ends at 0 or 255")
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise UsageError(f"--strength {args.strength}: must be in [0, 1] (0 returns the image, 1 ignores it; about 0.5 edits it)")
    if args.guidance < 0:
        raise UsageError(f"--guidance {args.guidance}: must be >= 0 (0 ignores the attributes, 1 is the conditional model)")
    if args.interpolate is not None and args.interpolate < 2:
        raise UsageError(f"--interpolate {args.interpolate}: a strip needs at least 2 frames (the two seeds' faces)")
    if args.figure == "reverse" and (args.n or 0) > 8:
        raise UsageError(f"--figure reverse draws up to 8 faces, each as two rows; use --n 8 or fewer (not {args.n})")
    if args.attrs is not None and not args.attrs.strip(", "):
        raise UsageError("--attrs '': ask for attributes as NAME=1 or NAME=0, e.g. --attrs Smiling=1; drop --attrs for "
                         "faces with every attribute left free")
    if args.bench:
        try:
            unet.check_config(unet.preset(args.size))
        except ValueError as e:
            raise UsageError(f"--size {e.args[1]}")
    if args.mask is not None and args.mask not in MASKS and not os.path.isfile(args.mask):
        raise UsageError(f"--mask {args.mask}: neither a region ({', '.join(MASKS)}) nor an image file; give one of them")
    if args.init is not None and not os.path.isfile(args.init):
        raise UsageError(f"--init {args.init}: no such file; give an image file (.jpg, .png, ...)")


def check_outputs(args):
    """Every output path is checked before sampling, so that a bad one loses no work."""
    if not args.bench:
        if os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a folder; give an image file name such as {os.path.join(args.out, 'samples.png')}")
        ext = os.path.splitext(args.out)[1].lower()
        if ext not in data.image_formats():
            raise UsageError(f"--out {args.out}: '{ext or 'no extension'}' is not an image format Pillow writes; use .png, .jpg or .webp")
        check_writable(os.path.dirname(args.out), "--out")
        data.remove_stale_temporaries(os.path.dirname(args.out) or ".")
    if args.out_dir:
        check_writable(args.out_dir, "--out-dir")
        data.remove_stale_temporaries(args.out_dir)


def parse_attrs(args, attr_names):
    """--attrs 'Smiling=1,Eyeglasses=0' (or --prompt's words) and --compare -> (K,) float in {+1, -1, 0}, or None: the
    model's unconditional path."""
    if args.prompt is not None:
        asked, understood, ignored = parse_prompt(args.prompt)
        if not asked:
            raise UsageError(f"--prompt {args.prompt!r}: no word of it names a CelebA attribute; try words such as smiling, "
                             "man, woman, blond, glasses, beard, hat, young, old (or --attrs NAME=1)")
        missing = [a for a in asked if a not in attr_names]
        if missing:
            raise UsageError(f"--prompt: {understood[missing[0]]!r} asks for {missing[0]}, which this model was not trained on; "
                             f"it knows {','.join(attr_names) or 'no attributes'}")
        print(f"prompt: understood {', '.join(f'{a}={v} ({understood[a]!r})' for a, v in asked.items())}; "
              f"ignored {', '.join(repr(w) for w in ignored) or 'nothing'}")
        args.attrs = ",".join(f"{a}={v}" for a, v in asked.items())
    if args.attrs is None and args.compare is None:
        return None
    names = list(attr_names)
    flag = "--attrs" if args.attrs is not None else "--compare"
    if not names:
        raise UsageError(f"{flag}: {args.ckpt} is an unconditional model (trained without --attrs); train one with "
                         "python train.py --attrs Smiling,Male,... or drop the flag")
    cond = torch.zeros(len(names))
    for item in (args.attrs or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        if name.strip() not in names:
            raise UsageError(f"--attrs: the model has no attribute {name.strip()!r}; it knows {','.join(names)}")
        if value.strip() not in ("0", "1"):
            raise UsageError(f"--attrs {item.strip()}: write NAME=1 (present) or NAME=0 (absent)")
        if cond[names.index(name.strip())] != 0:
            raise UsageError(f"--attrs names {name.strip()} twice; give each attribute once")
        cond[names.index(name.strip())] = 1.0 if value.strip() == "1" else -1.0
    if args.compare is not None:
        if args.compare not in names:
            raise UsageError(f"--compare: the model has no attribute {args.compare!r}; it knows {','.join(names)}")
        if cond[names.index(args.compare)] != 0:
            raise UsageError(f"--compare {args.compare} shows it absent and present; do not also set it in --attrs")
    return cond


def load_mask(args, size, device):
    """--mask -> (1, 1, size, size): 1 where --init is kept, 0 where the model fills in."""
    if args.mask in MASKS:
        top, bottom, left, right = (round(f * size) for f in MASKS[args.mask])
        fill = torch.zeros(size, size)
        fill[top:bottom, left:right] = 1
    else:
        try:
            fill = (data.preprocess(args.mask, size, args.crop).float().mean(0) > 127.5).float()  # white: fill in
        except Exception as e:
            raise UsageError(f"--mask {args.mask}: not an image that can be read ({type(e).__name__}); give a .png whose white pixels are filled in")
        if fill.sum() == 0:
            raise UsageError(f"--mask {args.mask}: has no white pixels, so nothing would be filled in; paint the region white")
        sizes = [Image.open(f).size for f in (args.mask, args.init)]
        if sizes[0] != sizes[1]:
            print(f"note: --mask {args.mask} is {sizes[0][0]}x{sizes[0][1]} and --init {args.init} {sizes[1][0]}x{sizes[1][1]}; "
                  f"each is cropped and resized to {size}x{size} on its own, so the mask lines up only if it was drawn on the same frame")
    return (1 - fill).view(1, 1, size, size).to(device)


# --prompt: plain words -> CelebA attributes. A parser over the attributes' names and their common phrasings, not a
# language model: a text encoder would be a dependency (and a download) this project keeps out on purpose.
PHRASES = {  # phrase -> (attribute, value); each attribute is also reachable by its own name, underscores as spaces
    "5 o clock shadow": ("5_o_Clock_Shadow", 1), "five o clock shadow": ("5_o_Clock_Shadow", 1), "stubble": ("5_o_Clock_Shadow", 1),
    "arched eyebrows": ("Arched_Eyebrows", 1), "attractive": ("Attractive", 1), "beautiful": ("Attractive", 1), "handsome": ("Attractive", 1),
    "bags under the eyes": ("Bags_Under_Eyes", 1), "bags under eyes": ("Bags_Under_Eyes", 1), "bald": ("Bald", 1),
    "bangs": ("Bangs", 1), "fringe": ("Bangs", 1), "big lips": ("Big_Lips", 1), "full lips": ("Big_Lips", 1),
    "big nose": ("Big_Nose", 1), "large nose": ("Big_Nose", 1), "black hair": ("Black_Hair", 1), "black haired": ("Black_Hair", 1),
    "blond": ("Blond_Hair", 1), "blonde": ("Blond_Hair", 1), "blond hair": ("Blond_Hair", 1), "blonde hair": ("Blond_Hair", 1),
    "blurry": ("Blurry", 1), "blurred": ("Blurry", 1), "out of focus": ("Blurry", 1), "sharp": ("Blurry", 0),
    "brown hair": ("Brown_Hair", 1), "brown haired": ("Brown_Hair", 1), "brunette": ("Brown_Hair", 1),
    "bushy eyebrows": ("Bushy_Eyebrows", 1), "thick eyebrows": ("Bushy_Eyebrows", 1), "chubby": ("Chubby", 1), "plump": ("Chubby", 1),
    "double chin": ("Double_Chin", 1), "eyeglasses": ("Eyeglasses", 1), "glasses": ("Eyeglasses", 1), "spectacles": ("Eyeglasses", 1),
    "sunglasses": ("Eyeglasses", 1), "goatee": ("Goatee", 1), "gray hair": ("Gray_Hair", 1), "grey hair": ("Gray_Hair", 1),
    "gray haired": ("Gray_Hair", 1), "grey haired": ("Gray_Hair", 1), "white hair": ("Gray_Hair", 1),
    "heavy makeup": ("Heavy_Makeup", 1), "makeup": ("Heavy_Makeup", 1), "make up": ("Heavy_Makeup", 1), "high cheekbones": ("High_Cheekbones", 1),
    "man": ("Male", 1), "men": ("Male", 1), "male": ("Male", 1), "boy": ("Male", 1), "guy": ("Male", 1), "gentleman": ("Male", 1), "he": ("Male", 1),
    "woman": ("Male", 0), "women": ("Male", 0), "female": ("Male", 0), "girl": ("Male", 0), "lady": ("Male", 0), "she": ("Male", 0),
    "open mouth": ("Mouth_Slightly_Open", 1), "mouth open": ("Mouth_Slightly_Open", 1), "parted lips": ("Mouth_Slightly_Open", 1),
    "mustache": ("Mustache", 1), "moustache": ("Mustache", 1), "narrow eyes": ("Narrow_Eyes", 1), "squinting": ("Narrow_Eyes", 1),
    "beard": ("No_Beard", 0), "bearded": ("No_Beard", 0), "clean shaven": ("No_Beard", 1), "beardless": ("No_Beard", 1),
    "oval face": ("Oval_Face", 1), "pale": ("Pale_Skin", 1), "pale skin": ("Pale_Skin", 1), "pointy nose": ("Pointy_Nose", 1),
    "pointed nose": ("Pointy_Nose", 1), "receding hairline": ("Receding_Hairline", 1), "rosy cheeks": ("Rosy_Cheeks", 1),
    "sideburns": ("Sideburns", 1), "smiling": ("Smiling", 1), "smile": ("Smiling", 1), "smiles": ("Smiling", 1), "grinning": ("Smiling", 1),
    "happy": ("Smiling", 1), "serious": ("Smiling", 0), "frowning": ("Smiling", 0), "straight hair": ("Straight_Hair", 1),
    "wavy hair": ("Wavy_Hair", 1), "wavy": ("Wavy_Hair", 1), "curly hair": ("Wavy_Hair", 1), "curly": ("Wavy_Hair", 1),
    "earrings": ("Wearing_Earrings", 1), "hat": ("Wearing_Hat", 1), "cap": ("Wearing_Hat", 1), "lipstick": ("Wearing_Lipstick", 1),
    "necklace": ("Wearing_Necklace", 1), "necktie": ("Wearing_Necktie", 1), "tie": ("Wearing_Necktie", 1),
    "young": ("Young", 1), "youthful": ("Young", 1), "old": ("Young", 0), "older": ("Young", 0), "elderly": ("Young", 0), "aged": ("Young", 0),
}
NEGATIONS = {"no", "not", "without", "non", "never"}
FILLER = {"a", "an", "the", "with", "and", "of", "face", "person", "portrait", "photo", "picture", "who", "is", "has", "having", "wearing",
          "in", "on", "her", "his", "very", "slightly", "some", "looking", "but", "or"}


def parse_prompt(text):
    """Plain words -> ({attribute: 1 or 0}, {attribute: the words that asked for it}, [ignored words]). A negation (no,
    not, without) flips the next attribute phrase of its clause (clauses end at commas and at 'and', 'but', 'with').
    An attribute asked for both ways is an error."""
    phrases = {**{name.lower().replace("_", " "): (name, 1) for name, _ in PHRASES.values()}, **PHRASES}
    phrases["no beard"] = ("No_Beard", 1)  # CelebA's own name, which the negation would otherwise flip
    text = text.lower().replace("n't", " not").replace("'", " ").replace("-", " ")
    words = text.replace(",", " , ").replace(".", " , ").replace(";", " , ").split()
    asked, understood, ignored, negation, i = {}, {}, [], None, 0
    while i < len(words):
        n = next((n for n in (5, 4, 3, 2, 1) if " ".join(words[i:i + n]) in phrases), 0)
        if n == 0:  # a negation, a word between phrases, or one it does not know
            w = words[i]
            negation = w if w in NEGATIONS else None if w in (",", "and", "but", "with") else negation
            if w not in NEGATIONS | FILLER | {","}:
                ignored.append(w)
            i += 1
            continue
        said = " ".join(words[i:i + n])
        (name, value), i = phrases[said], i + n
        if negation and said != "no beard":
            value, said = 1 - value, f"{negation} ... {said}"
        if name in asked and asked[name] != value:
            raise UsageError(f"--prompt asks for {name} both ways ({understood[name]!r} and {said!r}); ask for one")
        asked[name], understood[name], negation = value, said, None
    return asked, understood, ignored


def load_image(args, size, device):
    """--init -> (1, 3, size, size) in [-1, 1], through the training preprocessing (crop, antialiased resize)."""
    try:
        img = data.preprocess(args.init, size, args.crop)
    except Exception as e:
        raise UsageError(f"--init {args.init}: not an image that can be read ({type(e).__name__}); give a .jpg or .png")
    return data.to_float(img.unsqueeze(0), device)

# -----------------------------------------------------------------------------
# checkpoints (train.py writes and resumes them with these too)


def save_checkpoint(obj, path, flag="--out"):
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    atomic_write(write, path, flag)


def load_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt and foreign files.
    A folder is taken to mean the ckpt.pt inside it."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "ckpt.pt")):
            raise CheckpointError(f"{path} is a folder without a ckpt.pt; pass the checkpoint file that train.py wrote")
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; pass the ckpt.pt that train.py wrote (in its --out folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "GLOBAL" in str(e):  # weights_only met a reference to Python code: the file could run it if loaded
            raise CheckpointError(f"{path} was refused as unsafe: it refers to Python objects ({str(e).split('GLOBAL ')[-1].split()[0]}) "
                                  "that a checkpoint of this project never holds and that could run code when loaded; use a ckpt.pt "
                                  "written by train.py")
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated? {type(e).__name__}); "
                              "use another checkpoint or retrain")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} was not written by this project's train.py (no '{CKPT_FORMAT}' marker); "
                              "pass a ckpt.pt from train.py's --out folder")
    for part in ("model", "ema"):
        weights = ckpt.get(part)
        if isinstance(weights, dict) and not all(torch.isfinite(v).all() for v in weights.values() if torch.is_tensor(v) and v.is_floating_point()):
            raise CheckpointError(f"{path}: its {'EMA ' if part == 'ema' else ''}weights are not finite (NaN or inf), so every image "
                                  "would be blank; the run diverged before this was saved: use an earlier checkpoint or retrain")
    return ckpt


def model_from_checkpoint(ckpt, path, weights="ema", device="cpu"):
    """-> (UNet with the checkpoint's `weights`, the EMA ones by default; GaussianDiffusion) as the checkpoint
    describes them. On the meta device: a check, at no cost, that the config and the weights fit together."""
    try:
        with torch.device(device):
            model = unet.build(ckpt["model_args"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # on the meta device the copy is a no-op: only keys and shapes are checked
            model.load_state_dict(ckpt[weights])
        a = ckpt["args"]
        return model, GaussianDiffusion(a["timesteps"], a["schedule"], a["objective"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match this version of unet.py ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


# -----------------------------------------------------------------------------
# devices (train.py's too)


def pick_device(name, local_rank=0, local_world=1):
    """--device -> torch.device: the first available of cuda, mps, cpu when name is None. Under torchrun, process
    `local_rank` of the `local_world` on this machine takes GPU local_rank."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use cuda, cuda:N, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and max(local_world, (device.index or 0) + 1) > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UsageError(f"{max(local_world, (device.index or 0) + 1)} processes want a GPU each but {n} GPU{'s are' if n > 1 else ' is'} "
                         f"visible; start torchrun with --nproc_per_node={n} (or fewer), or use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def autocast(device, precision):
    """--precision -> (its name, the autocast context). auto: bf16 on GPUs with native bf16 (Ampere and later),
    fp16 on older GPUs (is_bf16_supported() alone also counts the slow emulated bf16 of a V100 or T4), fp32 on
    CPU and MPS. fp32 means fp32: TF32 matmuls and convolutions only come with the mixed precisions."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return precision, contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def synchronize(device):
    """Wait for the device's queued work, so that a timing measures it (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# -----------------------------------------------------------------------------
# figures: the forward and reverse process, the schedules, the loss curve (Pillow draws the few charts)


def face_grid(rows, col_labels, row_labels, scale):
    """rows: list of (k, 3, H, W) uint8 -> a PIL image, the faces enlarged `scale` times (nearest), labelled."""
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=255)  # (3, h, w)
    img = TF.to_pil_image(grid).resize((grid.shape[2] * scale, grid.shape[1] * scale), Image.NEAREST)
    left, top, cell = 8 + 7 * max(map(len, row_labels)), 16, img.height // len(rows)
    canvas = Image.new("RGB", (img.width + left, img.height + top), "white")
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(col_labels):
        draw.text((left + (i + 0.5) * img.width / len(rows[0]), 8), text, fill="black", anchor="mm")
    for i, text in enumerate(row_labels):
        draw.text((4, top + (i + 0.5) * cell), text, fill="black", anchor="lm")
    return canvas


def nice_ticks(lo, hi, log=False):
    """Round tick values in [lo, hi]: multiples of 1, 2 or 5 times a power of ten (on a log axis, those values themselves)."""
    if log:
        ticks = [m * 10 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
        if len([v for v in ticks if lo <= v <= hi]) >= 3:
            return [v for v in ticks if lo <= v <= hi]
    raw = (hi - lo) / 5 or 1
    step = min(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** math.floor(math.log10(raw)) >= raw)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def line_chart(series, title, xlabel, log_y=False, size=(360, 260)):
    """series: list of (name, xs, ys) -> a PIL line chart with axes, round ticks and a legend."""
    W, H, (l, r, t, b) = *size, (52, 10, 22, 34)  # plot area margins: left, right, top, bottom
    f = math.log10 if log_y else (lambda y: y)
    xs = [x for _, xx, _ in series for x in xx]
    ys = [y for _, _, yy in series for y in yy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 0.05 * ((f(y1) - f(y0)) or 1)
    px = lambda x: l + (x - x0) / ((x1 - x0) or 1) * (W - l - r)
    py = lambda y: H - b - (f(y) - f(y0) + pad) / (f(y1) - f(y0) + 2 * pad) * (H - t - b)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([l, t, W - r, H - b], outline="black")
    for xv in nice_ticks(x0, x1):
        d.text((px(xv), H - b + 4), f"{xv:g}", fill="black", anchor="mt")
    unf = (lambda v: 10 ** v) if log_y else (lambda v: v)
    for yv in nice_ticks(unf(f(y0) - pad), unf(f(y1) + pad), log_y):
        d.line([l - 3, py(yv), l, py(yv)], fill="black")
        d.text((l - 5, py(yv)), f"{yv:.4g}", fill="black", anchor="rm")
    d.text((W / 2, 4), title, fill="black", anchor="mt")
    d.text(((l + W - r) / 2, H - 4), xlabel, fill="black", anchor="mb")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (name, xx, yy) in enumerate(series):
        points = [(px(x), py(y)) for x, y in zip(xx, yy)]
        d.line(points, fill=colours[i % 4], width=2) if len(points) > 1 else d.ellipse([*points[0], *points[0]], outline=colours[i % 4])
        d.text((W - r - 6, t + 6 + 12 * i), name, fill=colours[i % 4], anchor="ra")
    return img


def save_figure(args, img, path=None, **kw):
    fmt = Image.registered_extensions()[os.path.splitext(path or args.out)[1].lower()]
    atomic_write(lambda tmp: img.save(tmp, format=fmt, **kw), path or args.out, "--out")
    print(f"wrote {path or args.out}")


def figure_forward(job):
    """One face (--init, or the model's own) under q(x_t | x_0) at FORWARD_T, a row per schedule, the same noise in every row."""
    args, T, device = job.args, job.diffusion.T, job.device
    face = job.x_init if job.x_init is not None else data.to_float(draw(job, 1), device)  # (1, 3, H, W) in [-1, 1]
    ts = [round(t * (T - 1) / 999) for t in FORWARD_T]
    noise = torch.randn(face.shape, generator=torch.Generator(device=device).manual_seed(args.seed), device=device)
    rows = []
    for name in SCHEDULES:
        d = GaussianDiffusion(T, name)
        rows.append(to_uint8(torch.cat([d.q_sample(face, torch.tensor([t], device=device), noise) for t in ts])))
    save_figure(args, face_grid(rows, [f"t={t}" for t in ts], list(SCHEDULES), max(1, 64 // face.shape[-1])))


def figure_reverse(job):
    """x_t (the top row of each pair) and the x0 predicted from it (the bottom row) at about ten of the sampler's steps,
    then the sample; and a GIF of every step, for --n (up to 8) faces."""
    args, frames = job.args, []  # frames: (t, the chain after the step from t, x0_hat at t)
    x_T = torch.randn((args.n, 3, job.size, job.size), generator=job.generator, device=job.device)
    x0 = draw(job, args.n, x_T, callback=lambda t, x, x0_hat: frames.append((t, x, x0_hat)))
    inputs = [x_T] + [x for _, x, _ in frames[:-1]]  # x_t, the chain where the model is evaluated at t
    steps = [(f"t={t}", to_uint8(x), to_uint8(p)) for (t, _, p), x in zip(frames, inputs)] + [("sample", x0, x0)]
    shown = [steps[round(i * (len(steps) - 2) / 9)] for i in range(10)] + steps[-1:] if len(steps) > 11 else steps
    scale, n = max(1, 64 // x_T.shape[-1]), len(x_T)
    rows = [torch.stack([s[k][i] for s in shown]) for i in range(n) for k in (1, 2)]
    save_figure(args, face_grid(rows, [s[0] for s in shown], ["x_t", "x0_hat"] * n, scale))
    gif = [face_grid([x, p], [label] + [""] * (n - 1), ["x_t", "x0_hat"], scale) for label, x, p in steps]
    save_figure(args, gif[0], os.path.splitext(args.out)[0] + ".gif", save_all=True, append_images=gif[1:],
                duration=[100] * (len(gif) - 1) + [2000], loop=0)


@torch.no_grad()
def attention_maps(job, x_T, timesteps):
    """Sample one face from x_T (1, 3, H, W), recording at each of `timesteps` the attention weights of the finest
    attention maps (averaged over their layers and heads) for each of QUERIES. -> (the face (1, 3, H, W) uint8,
    maps (len(QUERIES), len(timesteps), r, r): each a distribution over the r x r positions)."""
    model = getattr(job.model, "_orig_mod", job.model)  # hooks need the eager modules
    r = max(model.cfg.attn_res)
    queries = [round(y * (r - 1)) * r + round(x * (r - 1)) for y, x in QUERIES.values()]
    now, maps = [None], {t: [] for t in timesteps}
    def hook(module, inputs, output):
        x = inputs[0]
        if x.shape[-1] == r and now[0] in maps:  # the first image of the batch (the conditional half under guidance)
            maps[now[0]].append(module.weights(x[:1].float())[0].mean(0)[queries])  # (Q, r*r)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, unet.Attention)]
    def model_at(x, t, *a):
        now[0] = int(t[0])
        return job.model(x, t, *a)
    try:
        face = draw(Job(**{**vars(job), "model": model_at}), 1, x_T)
    finally:
        for h in handles:
            h.remove()
    return face, torch.stack([torch.stack(maps[t]).mean(0) for t in timesteps], 1).view(len(queries), len(timesteps), r, r)


def figure_attention(job):
    """For one generated face: where the finest self-attention (16x16 in the presets) of an eye, the mouth and the
    background looks, at four timesteps from noisy to clean (a row per query; red where it looks, the query boxed)."""
    ts = job.diffusion.timesteps(job.args.sampler, job.args.steps, job.args.spacing)
    ts = [ts[round(i * (len(ts) - 1) / 3)] for i in range(4)]
    x_T = torch.randn((1, 3, job.size, job.size), generator=job.generator, device=job.device)
    face, maps = attention_maps(job, x_T, ts)
    scale, colours = max(1, 128 // job.size), torch.tensor([[0, 255, 255], [255, 255, 0], [0, 255, 0]], dtype=torch.uint8)
    big = face[0].repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (3, S, S)
    grey = big.float().mean(0, keepdim=True).expand(3, -1, -1)
    rows = []
    for q, (y, x) in enumerate(QUERIES.values()):
        cells = [big.clone()]
        for m in maps[q]:
            a = F.interpolate(m[None, None] / m.max(), size=big.shape[1:], mode="bilinear")[0].clamp(0, 1)  # (1, S, S)
            cells.append((grey * (1 - a) + torch.tensor([255.0, 0, 0]).view(3, 1, 1) * a).round().to(torch.uint8))
        cy, cx, half = round(y * (big.shape[1] - 1)), round(x * (big.shape[2] - 1)), max(2, scale)
        for c in cells:  # a box around the query position
            box = c[:, max(cy - half, 0):cy + half + 1, max(cx - half, 0):cx + half + 1]
            box[:, [0, -1], :], box[:, :, [0, -1]] = colours[q].view(3, 1, 1), colours[q].view(3, 1, 1)
        rows.append(torch.stack(cells))
    save_figure(job.args, face_grid(rows, ["face"] + [f"t={t}" for t in ts], list(QUERIES), 1))


def figure_schedules(args):
    """alpha_bar_t and log-SNR = log(alpha_bar / (1 - alpha_bar)) against t for the three schedules, at the checkpoint's T."""
    T = load_checkpoint(args.ckpt)["args"]["timesteps"] if args.ckpt else 1000
    ds = [GaussianDiffusion(T, name) for name in SCHEDULES]
    ts = list(range(T))
    a = line_chart([(d.schedule, ts, d.alphas_cumprod.tolist()) for d in ds], "alpha_bar_t", "t")
    b = line_chart([(d.schedule, ts, torch.log(d.snr).tolist()) for d in ds], "log-SNR", "t")
    img = Image.new("RGB", (a.width + b.width, a.height), "white")
    img.paste(a, (0, 0))
    img.paste(b, (a.width, 0))
    save_figure(args, img)


def figure_loss(args):
    """The training loss of every progress line and the validation loss, from log.csv beside the checkpoint."""
    if args.ckpt is None:
        raise UsageError("--figure loss reads the run's log.csv: give the checkpoint or its folder")
    path = os.path.join(args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt), "log.csv")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        raise UsageError(f"--figure loss: no {path}; give the checkpoint in a train.py --out folder")
    series = [(name, [int(r["step"]) for r in rows if r[col]], [float(r[col]) for r in rows if r[col]])
              for name, col in (("train loss", "loss"), ("val loss", "val_loss"))]
    series = [s for s in series if s[1]]
    if not series:
        raise UsageError(f"--figure loss: {path} has no loss rows yet; train for at least --log-every steps")
    save_figure(args, line_chart(series, f"loss ({os.path.basename(os.path.dirname(os.path.abspath(path)))})", "step", log_y=True, size=(480, 300)))


if __name__ == "__main__":
    main()
