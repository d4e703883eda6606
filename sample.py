"""
Draw faces from a checkpoint written by train.py; the checkpoint alone rebuilds the model (EMA weights).

    python sample.py out/ckpt.pt                              # 64 faces -> samples.png
    python sample.py out/ckpt.pt --n 10000 --out-dir fid_gen  # numbered PNGs for FID tools
    python sample.py out/ckpt.pt --sampler ddpm               # 1000-step ancestral sampling
    python sample.py out/ckpt.pt --bpd 500                    # the bits/dim bound on validation images
    python sample.py ae/ckpt.pt --n 500 --out-dir rec         # an autoencoder: its reconstructions, and PSNR
    python sample.py ctl/ckpt.pt --hint-from face.jpg         # a ControlNet: faces with that photo's edges
    python sample.py --bench                                  # images/s of the default sampler

A latent model (train.py --latents) draws latents and decodes them with the autoencoder its checkpoint
carries: every mode below works on it but --bpd. The core first (load the checkpoint -> draw -> write), then
the other modes, the flags and the flags each mode takes, and last the figures of REPORT.md.
"""
import os
import signal
import sys


def quit_quietly(signum, frame):
    """Ctrl-C, SIGTERM or SIGHUP while torch loads: one line, not a traceback (main() then takes them
    over)."""
    print(f"{signal.Signals(signum).name}: interrupted", file=sys.stderr)
    os._exit(128 + signum)


if __name__ == "__main__":
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # (Windows has no SIGHUP)
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), quit_quietly)
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # short OpenMP spinning, as in train.py
import argparse
import csv
import functools
import math
import re
import time
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF

import autoencoder
import budget
import control
import data
import text as texts
import unet
import util
from diffusion import DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, SCHEDULES, GaussianDiffusion
from diffusion import guided, slerp
from util import UsageError

ERRORS = (UsageError, util.WriteError, util.CheckpointError, data.DataError)  # bad input
DEFAULT_GUIDANCE = 3.0  # the largest weight whose face quality stays within 10% (REPORT sec. 3.7)
REPAINT_STEPS = 250  # RePaint's face setting: 250 steps, jump length 10, 10 resamplings
GRID_MAX = 1024  # the grid shows at most this many images; more need --out-dir
FIGURES = ("forward", "reverse", "attention", "schedules", "loss")
FORWARD_T = (0, 50, 100, 250, 500, 750, 999)  # --figure forward's t at T = 1000 (scaled)
# --mask regions as (top, bottom, left, right) fractions of an aligned CelebA face
MASKS = dict(center=(0.25, 0.75, 0.25, 0.75), top=(0, 0.5, 0, 1), bottom=(0.5, 1, 0, 1), left=(0, 1, 0, 0.5),
             right=(0, 1, 0.5, 1), eyes=(0.33, 0.57, 0.15, 0.85), mouth=(0.62, 0.84, 0.28, 0.72))
QUERIES = dict(eye=(0.45, 0.36), mouth=(0.73, 0.5), background=(0.06, 0.06))  # --figure attention's, (y, x)
say = util.Say()  # print, which outlives a closed terminal
NETWORKS = dict(unet=unet.check_weights, autoencoder=autoencoder.check_weights,  # a checkpoint's networks
                control=control.check_weights)

# -----------------------------------------------------------------------------
# the core: checkpoint -> images


def main(argv=None):
    with util.one_line_errors(ERRORS):
        util.stop_on_signals()  # Ctrl-C, SIGTERM, SIGHUP: one line (every output is whole or not there)
        args, given = make_parser().parse(argv)
        run(args, given)


def run(args, given):
    opt = check_flags(args, given)  # checked before any work
    device = budget.pick_device(opt.device)
    precision, ctx = budget.autocast(device, opt.precision)
    budget.set_threads(device, say=say)
    torch.backends.cudnn.benchmark = True
    if opt.mode == "schedules":  # no model needed
        return figure_schedules(opt)
    if opt.mode == "loss":
        return figure_loss(opt)
    job = load(opt, given, device, ctx)
    describe(job, precision)
    other = dict(bench=bench, bpd=bits_per_dim, interpolate=interpolate, compare=compare,
                 reconstruct=reconstruct, forward=figure_forward, reverse=figure_reverse,
                 attention=figure_attention)
    if job.opt.mode in other:
        return other[job.opt.mode](job)
    # sampling, SDEdit or RePaint, batch after batch; the grid starts with --init
    grid = []
    if job.x_init is not None:
        shown = job.x_init if job.mask is None else job.x_init * job.mask
        grid.append(data.to_uint8(shown))
    if job.hints is not None and len(job.hints) == 1:  # a ControlNet's one hint
        grid.append(data.to_uint8(job.hints.expand(-1, 3, -1, -1) * 2 - 1))
    progress = util.Progress(opt.n, "sampling", "images", say)
    done = 0
    follow = []  # a ControlNet's: how well each image keeps its hint's edges
    while done < opt.n:
        x = draw(job, min(opt.batch_size, opt.n - done), progress=(progress, done), first=done)
        if sum(map(len, grid)) < GRID_MAX:  # the grid shows the first images only
            grid.append(x)
        write_pngs(opt, x, done)
        follow.append(edge_agreement(job, x, done))
        done += len(x)
    write_grid(opt, grid, pngs=done)
    if job.hints is not None:
        say(f"edges: Dice {torch.cat(follow).mean():.3f} over {done:,} images (each one's strongest "
            f"{control.EDGE_SHARE:.0%} of pixels by gradient against its hint's)")


@dataclass
class Job:
    """Everything a draw needs, from the flags and the checkpoint."""
    opt: argparse.Namespace  # the flags, with the mode's defaults
    model: object  # the EMA weights in eval mode, as a draw calls them (compiled with --compile)
    net: torch.nn.Module  # the network itself (the figures hook its layers); an autoencoder's reconstructs
    diffusion: GaussianDiffusion
    first_stage: object  # a latent model's autoencoder.FirstStage (encode, decode); autoencoder.Pixels else
    attr_names: tuple  # the model's attributes; () for an unconditional model
    size: int  # of the images
    shape: tuple  # (C, H, W) of what the model draws: an image, or a latent
    device: torch.device
    ctx: object  # autocast
    generator: torch.Generator = None
    steps: int = 0  # the sampler's steps
    evals: int = 1  # model evaluations per image
    ckpt_args: dict = None  # the training run's settings (its data, for --bpd)
    cond: torch.Tensor = None  # (K,) in {+1 present, -1 absent, 0 free}, a text model's tokens (L,), or None
    uncond: torch.Tensor = None  # a text model's: the empty caption's tokens, or a negative prompt's
    cond_name: str = "attrs"  # the model's keyword for the condition (a text model's: text)
    x_init: torch.Tensor = None  # (1, 3, size, size) in [-1, 1]: what SDEdit or RePaint edits
    mask: torch.Tensor = None  # (1, 1, size, size): 1 where --init is kept
    hints: torch.Tensor = None  # a ControlNet's (N, 1, size, size) in [0, 1]: image k follows hint k mod N

    def hints_for(self, first, n):
        """The hints of images first .. first + n - 1."""
        return self.hints[torch.arange(first, first + n, device=self.hints.device) % len(self.hints)]

    def noise(self, n, generator=None):
        """(n, C, H, W) standard normal noise from `generator` (default: the job's)."""
        if generator is None:
            generator = self.generator
        return torch.randn((n, *self.shape), generator=generator, device=self.device)

    def to_images(self, x):
        """What the model drew -> images in [-1, 1]: a latent model's latents decoded."""
        return self.first_stage.decode(x)


def load(opt, given, device, ctx):
    """The checkpoint's EMA model (without one, --bench's random preset), the condition, --init, --mask."""
    opt, net, diffusion, ckpt_args, first_stage = open_checkpoint(opt, given, device)
    if diffusion is None:  # an autoencoder: its reconstructions of --init or of validation images
        size = net.cfg.image_size
        if ckpt_args is not None and ckpt_args.get("latents"):  # a latent model's first stage: the run's size
            size = ckpt_args["size"]
        net = net.to(device).eval().requires_grad_(False)
        x_init = None
        if opt.init:
            x_init = read_image(opt.init, "--init", size, opt.crop)[None]  # (1, 3, size, size) uint8
        return Job(opt=opt, model=net, net=net, diffusion=None, first_stage=first_stage, attr_names=(),
                   size=size, shape=(3, size, size), device=device, ctx=ctx, ckpt_args=ckpt_args,
                   x_init=x_init)
    shape = (net.cfg.in_channels, net.cfg.image_size, net.cfg.image_size)
    size = net.cfg.image_size * first_stage.factor  # the images are the autoencoder's
    steps, evals = sampler_steps(opt, diffusion)
    net = net.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    model = net
    if opt.compile:
        model = torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else "default")
    x_init = None
    if opt.init:
        x_init = data.to_float(read_image(opt.init, "--init", size, opt.crop)[None], device)
    mask = None
    if opt.mask:
        mask = load_mask(opt, size, device)
    cond, uncond, name = condition(opt, net.cfg, device)
    hints = load_hints(opt, given, net, size, device)
    return Job(opt=opt, model=model, net=net, diffusion=diffusion.to(device), first_stage=first_stage,
               attr_names=tuple(net.cfg.attrs), size=size, shape=shape, device=device, ctx=ctx,
               generator=torch.Generator(device=device).manual_seed(opt.seed), steps=steps, evals=evals,
               ckpt_args=ckpt_args, cond=cond, uncond=uncond, cond_name=name, x_init=x_init, mask=mask,
               hints=hints)


def condition(opt, net, device):
    """What the draws follow: --attrs or --prompt for an attribute model; --prompt (and --negative-prompt,
    --compare) for a text model, whose words it says. -> (the condition or None (a text model's --compare: its
    two captions (2, L)); a text model's unconditional branch, the empty caption or the negative prompt; the
    model's keyword for the condition)."""
    if not net.vocab:
        if opt.negative_prompt is not None:
            raise UsageError(f"--negative-prompt: {opt.ckpt} is not a text model (train.py --text); drop it")
        if opt.prompt is not None and not net.attrs:
            raise UsageError(f"--prompt: {opt.ckpt} follows no words (it was trained without --text or "
                             "--attrs); drop --prompt, or sample a text model")
        if opt.prompt is not None:
            opt.attrs, opt.understood = prompt_to_attrs(opt.prompt)
        return parse_attrs(opt, net.attrs), None, "attrs"
    if opt.attrs is not None:
        raise UsageError(f"--attrs: {opt.ckpt} is a text model; ask in words with --prompt TEXT")
    if opt.prompt is None and opt.negative_prompt is None and opt.compare is None:
        return None, None, "text"
    prompt, compared, negative = prompt_words(opt, net)
    say(f"prompt: {prompt!r}" + (f", away from {negative!r}" if opt.negative_prompt else "")
        + (f"; compared with {compared!r}" if opt.compare is not None else ""))
    tokenizer = texts.Tokenizer(net.vocab)
    ids = tokenizer.batch([prompt, compared, negative], net.max_tokens).to(device)  # all padded alike
    if opt.compare is not None:
        return ids[:2], ids[2], "text"  # --compare's two rows
    return ids[0], ids[2], "text"


def prompt_words(opt, net):
    """A text model's captions: [--prompt, --prompt and --compare's words, --negative-prompt] (a missing one
    empty) in the words it knows. An unknown word is named and left out; a prompt of none is refused."""
    tokenizer = texts.Tokenizer(net.vocab)
    for flag, words in (("--prompt", opt.prompt), ("--compare", opt.compare), ("--negative-prompt",
                                                                               opt.negative_prompt)):
        ids, unknown, cut = tokenizer.encode(words or "", net.max_tokens)
        if words and len(ids) == 2:
            raise UsageError(f"{flag} {words!r}: the model knows none of these words; it knows "
                             f"{len(net.vocab) - len(texts.SPECIAL):,}, e.g. {' '.join(net.vocab[3:13])}")
        if unknown:
            say(f"note: {flag}: the model does not know {', '.join(map(repr, unknown))}: left out")
        if cut:
            say(f"note: {flag}: cut to the model's {net.max_tokens} tokens")
    captions = [opt.prompt, ", ".join(filter(None, [opt.prompt, opt.compare])), opt.negative_prompt]
    return [tokenizer.decode(tokenizer.encode(c or "", net.max_tokens)[0]) for c in captions]


def open_checkpoint(opt, given, device):
    """-> (the flags, for an autoencoder's checkpoint those of its reconstructions; the EMA network; its
    GaussianDiffusion, None for an autoencoder; the run's settings; the first stage: a latent model's
    autoencoder, or autoencoder.Pixels)."""
    if opt.ckpt is None:
        return opt, unet.UNet(unet.preset(opt.size)), GaussianDiffusion(), None, autoencoder.Pixels()
    ckpt = util.load_checkpoint(opt.ckpt, parts=("ema",), networks=NETWORKS, say=say)
    a = ckpt["args"]
    diffusion = None
    first_stage = autoencoder.Pixels()
    if util.network_of(ckpt, "ema") == "autoencoder":  # its reconstructions: another mode, other flags
        net = autoencoder.from_checkpoint(ckpt, "ema")
        opt = as_reconstruct(opt, given)
    elif opt.mode == "reconstruct":  # a latent model's first stage
        if "autoencoder" not in ckpt:
            raise UsageError(f"--reconstruct: {opt.ckpt} is a pixel model, which has no autoencoder to "
                             "reconstruct with; pass a latent model's or an autoencoder's checkpoint")
        net = autoencoder.from_checkpoint(ckpt, "autoencoder")
        opt = as_reconstruct(opt, given)
        say(f"loaded {opt.ckpt}: step {ckpt['step']}, its first stage, {describe_model(net, None, None)}")
        return opt, net, None, a, autoencoder.Pixels()
    elif opt.mode == "sample" and given & {"data", "cache_dir"}:
        dashed = "--" + sorted(given & {"data", "cache_dir"})[0].replace("_", "-")
        raise UsageError(f"{dashed} does not apply to sampling (it is for --bpd and an autoencoder's "
                         f"reconstructions); drop {dashed}")
    else:
        if opt.mode == "sample" and opt.n > GRID_MAX and not opt.out_dir:
            raise UsageError(f"--n {opt.n:,}: the grid keeps the first {GRID_MAX:,} images and the rest "
                             "would be lost; add --out-dir DIR to keep them all as PNGs, or lower --n")
        if util.network_of(ckpt, "ema") == "control":  # a ControlNet and its locked base
            net = control.from_checkpoint(ckpt, "ema")
        else:
            net = unet.from_checkpoint(ckpt, "ema")
        diffusion = GaussianDiffusion(a["timesteps"], a["schedule"], a["objective"], a.get("min_snr_gamma"))
    if "autoencoder" in ckpt:  # a latent model carries its first stage
        first_stage = autoencoder.FirstStage.from_checkpoint(ckpt).to(device, channels_last)
        check_latent_flags(opt, given)
    say(f"loaded {opt.ckpt}: step {ckpt['step']}, {describe_model(net, diffusion, first_stage)}")
    return opt, net, diffusion, a, first_stage


def channels_last(model):
    model.to(memory_format=torch.channels_last)


def sampler_steps(opt, diffusion):
    """-> (the sampler's steps, the model evaluations per image)."""
    T = diffusion.T
    if (opt.steps or 0) > T:
        raise UsageError(f"--steps {opt.steps} is more than the model's T={T}; use at most {T}")
    if opt.steps:
        steps = opt.steps
    elif opt.mask:
        steps = min(REPAINT_STEPS, T)
    else:
        steps = min(DEFAULT_STEPS, T)
    if opt.mask:  # each step down RePaint's path is one model evaluation
        path = diffusion.repaint_path(steps, opt.jump_length, opt.jump_n_sample)
        return steps, sum(q < p for p, q in zip(path, path[1:]))
    t_max = None
    if opt.strength is not None:  # SDEdit starts there
        t_max = max(round(opt.strength * T) - 1, 0)
    return steps, len(diffusion.timesteps(opt.sampler, steps, opt.spacing, t_max))


def describe_model(model, diffusion, first_stage):
    """The model of a checkpoint in a few words."""
    size = model.cfg.image_size
    words = f"{model.num_params() / 1e6:.2f}M parameters, {size}x{size}"
    if diffusion is None:
        c = model.cfg
        latent = f"{c.z_channels}x{c.latent_size}x{c.latent_size}"
        return f"an autoencoder of {words}, f={c.factor}, latents {latent}"
    words += f", T={diffusion.T} {diffusion.schedule} {diffusion.objective}"
    f = first_stage.factor
    if f > 1:
        words = (f"a latent model of {words} latents ({model.cfg.in_channels} channels) decoded to "
                 f"{size * f}x{size * f} by its autoencoder (f={f})")
    if isinstance(model, control.ControlledUNet):
        words = (f"a ControlNet of {model.trainable_params() / 1e6:.2f}M trained parameters on its locked "
                 f"base (weights {model.cfg.base_id}), together {words}")
    return words


def draw(job, n, x_T=None, cond=None, callback=None, progress=None, first=0):
    """n images (n, 3, H, W) uint8 from x_T (default: fresh noise): sampling, SDEdit or RePaint, guided toward
    `cond` (default: the job's condition). A latent model works on latents and decodes the result.
    callback(t, x_t, x0_hat) sees each step; progress: (util.Progress, the images done before); first: the
    number of the first image (a ControlNet's images follow their hints in turn)."""
    opt, diffusion = job.opt, job.diffusion
    if cond is None:
        cond = job.cond
    if x_T is None:
        x_T = job.noise(n)
    model = job.model
    if job.hints is not None:  # a ControlNet: each image's hint, in both branches of the guidance
        model = functools.partial(model, hint=job.hints_for(first, n))
    if cond is not None:
        model = guided(model, cond.to(job.device), opt.guidance, job.uncond, job.cond_name)
    steps = 0
    def step(*a):
        nonlocal steps
        steps += 1
        if callback:
            callback(*a)
        if progress:
            progress[0](progress[1] + n * steps / job.evals)
    clip = not opt.no_clip and job.first_stage.clip  # latents have no [-1, 1] to clip to
    kw = dict(sampler=opt.sampler, steps=job.steps, eta=opt.eta, generator=job.generator, clip=clip,
              var_type=opt.var, spacing=opt.spacing, callback=step)
    with job.ctx:
        if job.mask is not None:
            x = inpaint(job, model, x_T, n, clip, step)
        elif job.x_init is not None:
            x_init = job.first_stage.encode(job.x_init.expand(n, -1, -1, -1))
            x = diffusion.sdedit(model, x_init, opt.strength, x_T, **kw)
        else:
            x = diffusion.sample(model, x_T.shape, x_T=x_T, **kw)
        x = job.to_images(x)
    if job.mask is not None:  # the known pixels exactly (a latent model's too)
        x = job.mask * job.x_init + (1 - job.mask) * x
    return data.to_uint8(x)


def inpaint(job, model, x_T, n, clip, step):
    """RePaint of --init outside --mask, each image from its own noise; a latent model on the latent grid."""
    opt = job.opt
    # the hole filled with the kept pixels' mean colour first: an encoder sees past a latent's own patch, and
    # the hidden face must not leak into the latents that are kept
    kept = (job.x_init * job.mask).sum((2, 3), keepdim=True) / job.mask.sum().clamp(min=1)
    filled = job.mask * job.x_init + (1 - job.mask) * kept
    x_known = job.first_stage.encode(filled.expand(n, -1, -1, -1))
    mask = job.first_stage.mask(job.mask)
    return job.diffusion.repaint(model, x_T, x_known, mask, job.steps, opt.jump_length, opt.jump_n_sample,
                                 job.generator, clip, step)


def edge_agreement(job, x, first):
    """A ControlNet's images x (n, 3, H, W) uint8 against their hints: the Dice of their edges (n,); else an
    empty tensor."""
    if job.hints is None:
        return torch.zeros(0)
    return control.edge_dice(data.to_float(x, job.device), job.hints_for(first, len(x))).cpu()


def write_pngs(opt, x, first):
    """The images as numbered PNGs in --out-dir, from number `first`, each whole or not at all."""
    if not opt.out_dir:
        return
    for i, img in enumerate(x):
        util.write_png(img, os.path.join(opt.out_dir, f"{first + i:06d}.png"), "--out-dir")


def write_grid(opt, batches, nrow=None, pngs=None):
    """The grid --out of the first GRID_MAX images; says where each output went (pngs: how many numbered PNGs
    were written, if not one per image of the grid)."""
    if pngs is None:
        pngs = sum(map(len, batches))
    x = torch.cat(batches)[:GRID_MAX]
    if nrow is None:
        nrow = round(math.sqrt(len(x))) if len(x) > 8 else len(x)
    util.save_image(x, opt.out, "--out", nrow=nrow)
    line = f"wrote {os.path.abspath(opt.out)}"
    if opt.out_dir:
        line += f" and {pngs:,} numbered PNGs in {os.path.abspath(opt.out_dir)}"
    say(line)

# -----------------------------------------------------------------------------
# the other modes


def compare(job):
    """--compare NAME: every face with NAME absent (top row) and present (bottom row), from the same noise (a
    text model's: --prompt without and with the words NAME)."""
    opt = job.opt
    conds = job.cond  # a text model's two captions
    if job.cond_name == "attrs":
        k = torch.tensor([job.attr_names.index(opt.compare)])
        conds = [job.cond.index_fill(0, k, value) for value in (-1.0, 1.0)]
    halves = []
    x_T = job.noise(opt.n)
    for cond in conds:
        job.generator.manual_seed(opt.seed + 1)
        halves.append(draw(job, opt.n, x_T, cond))
        write_pngs(opt, halves[-1], opt.n * (len(halves) - 1))
    write_grid(opt, halves, nrow=opt.n)


def interpolate(job):
    """--interpolate N: a strip from --seed's sample to --seed + 1's, the noises slerped."""
    opt = job.opt
    frames = []
    b = opt.batch_size
    z = [job.noise(1, torch.Generator(device=job.device).manual_seed(s)) for s in (opt.seed, opt.seed + 1)]
    x_T = slerp(z[0], z[1], torch.linspace(0, 1, opt.interpolate))
    progress = util.Progress(opt.interpolate, "frames", "images", say)
    for i in range(0, len(x_T), b):
        frames.append(draw(job, len(x_T[i:i + b]), x_T[i:i + b], progress=(progress, i)))
        write_pngs(opt, frames[-1], i)
    write_grid(opt, frames, nrow=opt.interpolate)


def bench(job):
    """Images/s of the sampler, after a 2-step warm-up (compilation, CUDA graphs, autotuning)."""
    n = job.opt.batch_size
    draw(dataclasses.replace(job, steps=min(job.steps, 2)), n)
    budget.synchronize(job.device)
    t0 = time.time()
    draw(job, n)
    budget.synchronize(job.device)
    dt = time.time() - t0
    say(f"bench: {n / dt:,.1f} images/s | {n} images of {job.size}x{job.size} in {dt:.2f}s | "
        f"{job.opt.sampler} {job.evals} steps | {dt / job.evals * 1e3:.1f} ms per step")


@torch.no_grad()
def bits_per_dim(job):
    """--bpd N: the variational bound, [DDPM] eq. 5, on N validation images of the run's data (or --data):
    every t, or an estimate from --bpd-t K stratified t per image."""
    opt, diffusion = job.opt, job.diffusion
    if opt.bpd_t >= diffusion.T:
        raise UsageError(f"--bpd-t {opt.bpd_t}: more than the model's T-1 = {diffusion.T - 1} timesteps; use "
                         "fewer, or 0 for every t")
    valid = validation_images(job, opt.bpd)
    parts = []
    g = torch.Generator(device=job.device).manual_seed(opt.seed)
    progress = util.Progress(len(valid), "bits/dim", "images", say)
    for i in range(0, len(valid), opt.batch_size):
        with job.ctx:
            x0 = data.to_float(valid[i:i + opt.batch_size], job.device)
            parts.append(diffusion.bits_per_dim(job.model, x0, g, t_samples=opt.bpd_t or None))
        progress(i + len(x0))
    r = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    se = " (one image: no standard error)"
    if len(r["total"]) > 1:
        se = f" +- {r['total'].std().item() / math.sqrt(len(r['total'])):.4f}"
    how = f"an unbiased estimate from {opt.bpd_t} stratified t per image" if opt.bpd_t else "every t"
    say(f"bits/dim on {util.plural(len(valid), 'validation image')} (T={diffusion.T}, {how}): prior L_T "
        f"{r['prior'].mean():.4f} + sum of L_t {r['vb'].mean():.4f} + decoder L_0 {r['decoder'].mean():.4f} "
        f"= {r['total'].mean():.4f}{se}")


def validation_images(job, n):
    """The first n validation images of the run's data (or --data), (n, 3, H, W) uint8, as the run cropped
    them."""
    a = job.ckpt_args
    opt = job.opt
    valid = data.load(opt.data or a["data"], job.size, "valid", a["crop"], opt.cache_dir, log=say)["images"]
    return valid[:n]


@torch.no_grad()
def reconstruct(job):
    """An autoencoder's (or a latent model's first stage's) reconstructions of --init, or of the first --n
    validation images (the decoded posterior means), their PSNR, and a grid of originals above
    reconstructions."""
    opt = job.opt
    if job.x_init is not None:
        valid = job.x_init
    else:
        valid = validation_images(job, opt.n)
    if len(valid) < opt.n and job.x_init is None:
        say(f"note: the validation split holds {util.plural(len(valid), 'image')}: "
            f"{util.plural(len(valid), 'reconstruction')}, not --n {opt.n:,}")
    progress = util.Progress(len(valid), "reconstructions", "images", say)
    originals = []
    images = []
    psnr = []
    for i in range(0, len(valid), opt.batch_size):
        x = data.to_float(valid[i:i + opt.batch_size], job.device)
        with job.ctx:
            r = autoencoder.reconstruct(job.model, x)
        psnr.append(autoencoder.psnr(data.to_float(data.to_uint8(r), job.device), x))  # of the saved PNGs
        originals.append(valid[i:i + opt.batch_size])
        images.append(data.to_uint8(r))
        write_pngs(opt, images[-1], i)
        progress(i + len(x))
    psnr = torch.cat(psnr)
    what = opt.init if job.x_init is not None else util.plural(len(valid), "validation image")
    say(f"reconstructions of {what}: PSNR {psnr.mean():.2f} dB (median {psnr.median():.2f}, worst "
        f"{psnr.min():.2f})")
    k = max(1, round(math.sqrt(min(len(valid), GRID_MAX // 2))))  # images per row
    x, r = torch.cat(originals)[:GRID_MAX // 2], torch.cat(images)[:GRID_MAX // 2]
    rows = [part for i in range(0, len(x), k) for part in (x[i:i + k], r[i:i + k])]
    write_grid(opt, rows, nrow=k, pngs=len(valid))


def describe(job, precision):
    """What will be drawn, and how: one line."""
    opt = job.opt
    if opt.mode == "bpd":
        how = "the variational bound"
    elif opt.mode == "reconstruct" and job.x_init is not None:
        how = f"the reconstruction of {opt.init}"
    elif opt.mode == "reconstruct":
        how = f"reconstructions of up to {util.plural(opt.n, 'validation image')}"
    elif opt.mask:
        how = (f"RePaint inpainting of {opt.init} ({opt.mask}): {job.steps} steps, jump length "
               f"{opt.jump_length}, {opt.jump_n_sample} passes, {job.evals} model calls per image")
    else:
        how = f"{opt.sampler} with {job.evals} steps"
        if opt.sampler == "ddim":
            how += f", eta {opt.eta}"
        if opt.strength is not None:
            how += f"; SDEdit of {opt.init} from t = {round(opt.strength * job.diffusion.T)}"
    if job.cond is not None and job.cond_name == "text":
        how += f"; text guidance {opt.guidance:g}"
    elif job.cond is not None:
        asked = [opt.attrs] if opt.attrs else []
        if opt.compare:
            asked.append(f"{opt.compare}=0|1")
        how += f"; {' and '.join(asked)} with guidance {opt.guidance:g}"
    say(f"device {job.device}, {precision}, {how}")

# -----------------------------------------------------------------------------
# the flags, the flags each mode takes, and the checks that run before any work


def make_parser():
    p = util.Parser(description="Sample faces from a train.py checkpoint.", epilog="A flag that the mode "
                    "does not use is an error, not ignored. CPU threads: one per idle core; "
                    "OMP_NUM_THREADS=N chooses.")
    pos = util.positive(int)
    path = util.path
    fraction = util.between(0, 1)
    add = p.add_argument
    add("ckpt", nargs="?", type=path, help="checkpoint (out/ckpt.pt, or its folder)")
    add("--n", type=pos, help="number of images (default: 64; --figure reverse: 8)")
    add("--batch-size", type=pos, default=256, help="images per forward pass")
    add("--sampler", choices=SAMPLERS, help="DDIM, DPM-Solver++(2M), its SDE twin, or DDPM (all T steps) "
        f"(default: {DEFAULT_SAMPLER})")
    add("--steps", type=pos, help="model evaluations of ddim and dpm++; with --mask, RePaint's steps "
        f"(default: {DEFAULT_STEPS}; --mask {REPAINT_STEPS})")
    add("--spacing", default="logsnr", choices=["logsnr", "time"], help="the DPM-Solvers' steps: uniform in "
        "log-SNR or in t")
    add("--eta", type=fraction, help=f"DDIM eta: 0 deterministic, 1 DDPM-like (default: {DEFAULT_ETA:g}; "
        "--interpolate: 0)")
    add("--var", default="beta", choices=["beta", "posterior"], help="ddpm's sigma_t^2")
    add("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    add("--seed", type=util.random_seed, default=0, help="random seed: the same seed, the same faces")
    add("--out", type=path, default="samples.png", help="the grid or figure (.png, .jpg, .webp)")
    add("--out-dir", type=path, help="also every image as a numbered PNG in this folder")
    add("--device", help="cuda, mps or cpu (default: the first available)")
    add("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast; auto: bf16 "
        "on GPUs that have it, else fp16; fp32 on CPU/MPS")
    add("--compile", action="store_true", help="torch.compile the model (CUDA graphs on a GPU)")
    add("--init", type=path, help="SDEdit: edit this image instead of sampling from noise")
    add("--strength", type=fraction, help="SDEdit: noise --init to t = strength * T, then denoise (0 "
        "returns it, 1 ignores it; default 0.5)")
    add("--crop", default="auto", choices=data.CROPS, help="the crop of --init, a --mask image and "
        "--hint-from's photos")
    add("--interpolate", type=util.between(2, math.inf, int), metavar="FRAMES", help="a strip of FRAMES "
        "faces from --seed's noise to --seed + 1's")
    add("--attrs", metavar="NAME=0|1,...", help="attributes of a model trained with --attrs, e.g. "
        "'Smiling=1,Eyeglasses=0'; the others are left free")
    add("--prompt", metavar="TEXT", help="what to draw, in words: a text model's caption, or for an "
        "attribute model its attributes, e.g. 'a smiling blond woman, no hat'")
    add("--negative-prompt", metavar="TEXT", help="a text model: what guidance steers away from (in place of "
        "the empty caption)")
    add("--guidance", type=util.between(0, math.inf), default=DEFAULT_GUIDANCE, help="classifier-free "
        "guidance weight W: 1 the conditional model, larger follows more strictly")
    add("--compare", metavar="NAME", help="every face without and with attribute NAME (a text model: without "
        "and with the words NAME after --prompt's)")
    add("--hint", type=path, metavar="SKETCH", help="a ControlNet: the edges to follow, drawn as white lines "
        "on black (any size: resized to the model's)")
    add("--hint-from", type=path, metavar="PHOTO|DIR", help="a ControlNet: follow a photo's edges (cropped "
        "by --crop); a folder: image k follows its k-th photo's")
    add("--control-scale", type=util.between(0, math.inf), default=1.0, help="a ControlNet: the weight of "
        "its control (0: the base alone)")
    add("--mask", metavar="REGION|MASK.png", help=f"inpaint --init (RePaint): {', '.join(MASKS)}, or the "
        "white pixels of a mask image")
    add("--jump-length", type=pos, default=10, help="RePaint: steps back up")
    add("--jump-n-sample", type=pos, default=10, help="RePaint: passes per jump")
    add("--figure", choices=FIGURES, help="a figure of REPORT.md instead of samples (loss: from the run's "
        "log.csv; reverse: also an animation, --out's name with .gif)")
    add("--bench", action="store_true", help="time sampling one batch")
    add("--reconstruct", action="store_true", help="a latent model's autoencoder: its reconstructions of "
        "--init or of --n validation images (an autoencoder's checkpoint makes them without it)")
    add("--size", type=pos, default=64, help="--bench without a checkpoint: that size's preset")
    add("--bpd", type=pos, metavar="N", help="the bits/dim bound on N validation images")
    add("--bpd-t", type=util.count, default=0, help="--bpd estimated from this many random t per "
        "image (0: every t)")
    add("--data", type=path, help="--bpd, and an autoencoder's reconstructions: the data (default: the "
        "run's)")
    add("--cache-dir", type=path, help="--bpd, and an autoencoder's reconstructions: the cache of decoded "
        "images")
    return p


# the flags each mode takes (besides the checkpoint); any other is an error
DRAWS = {"sampler", "steps", "eta", "var", "spacing", "no_clip", "seed", "device", "precision", "compile",
         "attrs", "prompt", "negative_prompt", "guidance", "hint", "hint_from", "control_scale"}
FILES = {"n", "batch_size", "out", "out_dir"}
INPAINTS = {"init", "mask", "crop", "jump_length", "jump_n_sample"}
# an autoencoder's checkpoint: its reconstructions of --init or of validation images
RECONSTRUCT = {"n", "batch_size", "out", "out_dir", "data", "cache_dir", "device", "precision", "init",
               "crop", "reconstruct"}
MODES = dict(
    sample=DRAWS | FILES | {"data", "cache_dir"},  # --data: an autoencoder's (checked once it is loaded)
    sdedit=DRAWS | FILES | {"init", "strength", "crop"},
    repaint=DRAWS - {"sampler", "eta", "var", "spacing"} | FILES | INPAINTS,
    compare=DRAWS | {"n", "out", "out_dir", "compare"}, interpolate=DRAWS | FILES - {"n"} | {"interpolate"},
    bench=DRAWS | {"bench", "size", "batch_size"},
    bpd={"bpd", "bpd_t", "data", "cache_dir", "batch_size", "seed", "device", "precision", "compile"},
    reconstruct=RECONSTRUCT,
    forward=DRAWS | {"figure", "out", "init", "crop"}, reverse=DRAWS | {"figure", "out", "n"},
    attention=DRAWS | {"figure", "out"}, schedules={"figure", "out"}, loss={"figure", "out"})
SAMPLER_FLAGS = dict(eta=("ddim",), var=("ddpm",), spacing=("dpm++", "dpm++sde"),
                     steps=("ddim", "dpm++", "dpm++sde"))  # the flags that some samplers take
# --figure forward of --init: that image under the forward process, nothing drawn
FORWARD_INIT = {"figure", "out", "init", "crop", "seed", "device", "precision"}
REPAINT = ": RePaint inpaints: add --init IMAGE --mask REGION"
HINTS = dict(strength=": it edits an image: add --init IMAGE", crop=" (it crops --init)", jump_length=REPAINT,
             jump_n_sample=REPAINT, size=" (--bench without a checkpoint)")


def mode_of(args):
    """The mode: the first of a figure, reconstruct, bench, bpd, interpolate, compare, repaint, sdedit,
    sample."""
    if args.figure:
        return args.figure
    for mode, flag in (("reconstruct", args.reconstruct), ("bench", args.bench), ("bpd", args.bpd),
                       ("interpolate", args.interpolate), ("compare", args.compare), ("repaint", args.mask),
                       ("sdedit", args.init)):
        if flag:
            return mode
    return "sample"


def mode_name(mode):
    """How a message names a mode."""
    if mode in FIGURES:
        return f"--figure {mode}"
    names = dict(sample="sampling", sdedit="SDEdit (--init)", repaint="RePaint (--mask)",
                 reconstruct="an autoencoder's reconstructions")
    return names.get(mode, "--" + mode)


def check_flags(args, given):
    """Flags the mode does not take, and bad values, before any work. -> a copy of the flags with the mode
    and its defaults."""
    mode = mode_of(args)
    takes = MODES[mode]
    if mode == "forward" and args.init:
        takes = FORWARD_INIT
    if args.hint_from and "hint_from" in takes:  # --crop crops its photos
        takes = takes | {"crop"}
    for flag in sorted(given - takes - {"ckpt", mode}, key=list(vars(args)).index):
        dashed = "--" + flag.replace("_", "-")
        hint = HINTS.get(flag, "")
        if flag == "sampler" and mode == "repaint":
            hint = ": RePaint takes its own steps"
        if mode == "forward" and args.init and flag in MODES["forward"]:
            hint = ": with --init the figure noises that image and draws nothing"
        raise UsageError(f"{dashed} does not apply to {mode_name(mode)}; drop {dashed}{hint}")
    sampler = args.sampler or DEFAULT_SAMPLER
    if mode == "repaint":
        sampler = "repaint"
    for flag, samplers in SAMPLER_FLAGS.items():
        if flag in given and mode != "repaint" and sampler not in samplers:
            hint = ": ddpm takes all T steps; for fewer: --sampler ddim --eta 1" if flag == "steps" else ""
            raise UsageError(f"--{flag} does not apply to --sampler {sampler} (only to "
                             f"{', '.join(samplers)}); drop --{flag}{hint}")
    eta = args.eta
    if eta is None:
        eta = 0.0 if mode == "interpolate" else DEFAULT_ETA  # interpolation needs a deterministic sampler
    n = args.n
    if n is None:
        n = 8 if mode == "reverse" else 64
    strength = args.strength
    if mode == "sdedit" and strength is None:
        strength = 0.5
    opt = argparse.Namespace(**{**vars(args), "mode": mode, "sampler": sampler, "eta": eta, "n": n,
                                "strength": strength})
    check_values(opt, given)
    check_outputs(opt)
    return opt


def as_reconstruct(opt, given):
    """An autoencoder's checkpoint: the flags of its reconstructions. -> the flags, in mode reconstruct."""
    for flag in sorted(given - RECONSTRUCT - {"ckpt"}, key=list(vars(opt)).index):
        dashed = "--" + flag.replace("_", "-")
        raise UsageError(f"{dashed} does not apply to an autoencoder's reconstructions ({opt.ckpt}), which "
                         "draw no faces of their own but reconstruct --init or --n validation images (--out, "
                         f"--out-dir, --data); drop {dashed}, or pass the checkpoint of a train.py --latents "
                         "run")
    if opt.n > GRID_MAX // 2 and not opt.out_dir:  # each reconstruction beside its original
        raise UsageError(f"--n {opt.n:,}: the grid keeps the first {GRID_MAX // 2:,} reconstructions (each "
                         "below its original) and the rest would be lost; add --out-dir DIR to keep them all "
                         "as PNGs, or lower --n")
    return argparse.Namespace(**{**vars(opt), "mode": "reconstruct"})


def check_latent_flags(opt, given):
    """What a latent model cannot do."""
    if opt.mode == "bpd":
        raise UsageError(f"--bpd: {opt.ckpt} is a latent model, whose bound would be in bits per latent "
                         "value of its autoencoder, not per pixel; use a pixel model's checkpoint")
    if "no_clip" in given:
        raise UsageError(f"--no-clip: {opt.ckpt} is a latent model, whose latents are never clipped (they "
                         "have no [-1, 1] range); drop --no-clip")


def check_values(opt, given):
    """The values, files and combinations that make sense."""
    interpolate_bad = opt.mode == "interpolate" and (opt.sampler in ("ddpm", "dpm++sde") or opt.eta > 0)
    with_eta = f" with eta {opt.eta:g}" if opt.eta else ""
    for bad, message in [
        (opt.ckpt is None and opt.mode == "loss", "--figure loss reads log.csv: give the run's checkpoint"),
        (opt.ckpt is None and opt.mode not in ("bench", "schedules"), "no checkpoint given; usage: python "
         "sample.py out/ckpt.pt"),
        (opt.mode == "repaint" and opt.init is None, f"--mask {opt.mask} inpaints: add --init IMAGE"),
        (opt.ckpt is not None and "size" in given, "--size sets the model that --bench times without a "
         "checkpoint: drop --size"),
        (interpolate_bad, "--interpolate needs a deterministic sampler: --sampler ddim --eta 0 (the default "
         f"here) or dpm++, not {opt.sampler}{with_eta}"),
        ("guidance" in given and not (opt.attrs or opt.prompt or opt.compare or opt.negative_prompt),
         "--guidance weighs what is asked for: add --prompt TEXT (or --attrs NAME=1, or --compare NAME)"),
        (opt.prompt is not None and opt.attrs is not None, "--prompt and --attrs both ask for attributes; "
         "use one of them"),
        (opt.mode == "reverse" and opt.n > 8, f"--n {opt.n}: --figure reverse draws up to 8 faces"),
        (opt.mode in ("sdedit", "repaint", "compare") and opt.n > GRID_MAX and not opt.out_dir,
         f"--n {opt.n:,}: the grid keeps the first {GRID_MAX:,} images and the rest would be lost; add "
         "--out-dir DIR to keep them all as PNGs, or lower --n"),
        (opt.attrs is not None and not opt.attrs.strip(", "), "--attrs '': ask for NAME=1 or NAME=0, or "
         "drop --attrs"),
        (opt.mask not in (None, *MASKS) and not os.path.isfile(opt.mask), f"--mask {opt.mask}: neither a "
         f"region ({', '.join(MASKS)}) nor an image file"),
        (opt.init is not None and not os.path.isfile(opt.init), f"--init {opt.init}: no such file"),
        (opt.hint is not None and opt.hint_from is not None, "--hint and --hint-from both give the edges to "
         "follow: use one of them"),
        (opt.hint is not None and not os.path.isfile(opt.hint), f"--hint {opt.hint}: no such file"),
        (opt.hint_from is not None and not os.path.exists(opt.hint_from), f"--hint-from {opt.hint_from}: no "
         "such file or folder"),
    ]:
        if bad:
            raise UsageError(message)
    if opt.mode == "bench" and opt.ckpt is None:
        try:
            unet.check_config(unet.preset(opt.size))
        except ValueError as e:
            field, message = e.args
            if field == "image_size":
                raise UsageError(f"--size {message}")
            base = max([s for s in unet.PRESETS if s <= opt.size] or [min(unet.PRESETS)])
            raise UsageError(f"--size {opt.size}: the {base} preset it takes cannot be built at that size "
                             f"(its {field}: {message}); use a size the presets are for, 8 to 256")


def check_outputs(opt):
    """Every output path, before any work. --out-dir holds no other run's PNGs."""
    if opt.mode not in ("bench", "bpd"):
        if os.path.isdir(opt.out):
            raise UsageError(f"--out {opt.out} is a folder; give an image file name")
        ext = os.path.splitext(opt.out)[1].lower()
        if ext not in image_formats():
            raise UsageError(f"--out {opt.out}: '{ext or 'no extension'}' is not an image format Pillow "
                             "writes; use .png, .jpg or .webp")
        util.check_writable(os.path.dirname(opt.out), "--out")
    if opt.out_dir:
        old = []
        if os.path.isdir(opt.out_dir):
            old = [f for f in os.listdir(opt.out_dir) if f[:6].isdigit() and f.endswith(".png")]
        if old:
            raise UsageError(f"--out-dir {opt.out_dir} already holds {len(old):,} numbered PNGs ({min(old)} "
                             "...), which the new ones would mix with; remove them or pick another folder")
        util.check_writable(opt.out_dir, "--out-dir")


def image_formats():
    """File extensions Pillow can write, e.g. {'.png', '.jpg', ...}."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def parse_attrs(opt, attr_names):
    """--attrs 'Smiling=1,Eyeglasses=0' (or --prompt's) and --compare -> (K,) float in {+1, -1, 0}, or None
    (the unconditional model)."""
    names = list(attr_names)
    def index(name, flag):
        if name not in names:
            why = (f"{opt.understood[name]!r} asks for {name}, which this model was not trained on"
                   if flag == "--prompt" else f"the model has no attribute {name!r}")
            raise UsageError(f"{flag}: {why}; it knows {','.join(names) or 'no attributes'}")
        return names.index(name)
    if opt.attrs is None and opt.compare is None:
        return None
    if not names and not opt.prompt:
        raise UsageError(f"{'--attrs' if opt.attrs is not None else '--compare'}: {opt.ckpt} is an "
                         "unconditional model; train one with python train.py --attrs Smiling,Male,... or "
                         "drop it")
    cond = torch.zeros(len(names))
    for item in filter(str.strip, (opt.attrs or "").split(",")):
        name, _, value = (s.strip() for s in item.partition("="))
        k = index(name, "--prompt" if opt.prompt else "--attrs")
        if value not in ("0", "1"):
            raise UsageError(f"--attrs {item.strip()}: write NAME=1 (present) or NAME=0 (absent)")
        if cond[k] != 0:
            raise UsageError(f"--attrs names {name} twice; give each attribute once")
        cond[k] = 1.0 if value == "1" else -1.0
    if opt.compare is not None and cond[index(opt.compare, "--compare")] != 0:
        raise UsageError(f"--compare {opt.compare} shows it absent and present; do not set it in --attrs")
    return cond


def read_image(path, flag, size, crop):
    """--init or a --mask image -> (3, size, size) uint8, preprocessed as in training."""
    try:
        return data.preprocess(path, size, crop)
    except Exception as e:
        raise UsageError(f"{flag} {path}: not an image that can be read ({type(e).__name__}); give a .jpg or "
                         ".png")


def load_hints(opt, given, net, size, device):
    """A ControlNet's hints: --hint's drawing (white lines on black; dark lines on white are inverted), or the
    edges of --hint-from's photo or folder of photos, cropped as --crop. -> (N, 1, size, size) in [0, 1], or
    None (another model; --bench)."""
    asked = sorted(given & {"hint", "hint_from", "control_scale"})
    controlled = isinstance(net, control.ControlledUNet)
    if not (controlled or net.cfg.hint_channels):
        if asked:
            dashed = "--" + asked[0].replace("_", "-")
            raise UsageError(f"{dashed}: {opt.ckpt} is not a ControlNet (train.py --control); drop {dashed}")
        return None
    what = "a ControlNet" if controlled else "a model of edge maps (train.py --hint-concat)"
    if controlled:
        net.scale = opt.control_scale
    elif "control_scale" in given:
        raise UsageError(f"--control-scale weights a ControlNet's control; {opt.ckpt} is {what}, which reads "
                         "the hint as input: drop --control-scale")
    if opt.mode == "bpd":
        raise UsageError(f"--bpd: {opt.ckpt} is {what}, whose likelihood depends on its hint; use a model "
                         "without one")
    if opt.mode == "bench":
        return None  # timed with the all-black hint
    if opt.hint is None and opt.hint_from is None:
        raise UsageError(f"{opt.ckpt} is {what}: give it the edges to follow, --hint SKETCH.png (white "
                         "lines on black) or --hint-from PHOTO (or a folder of photos)")
    if opt.hint is not None:
        hint = read_image(opt.hint, "--hint", size, "none").float().mean(0, keepdim=True)[None] / 255
        if hint.mean() > 0.5:
            say(f"note: --hint {opt.hint} is mostly white: taken as dark lines on white, and inverted")
            hint = 1 - hint
        if hint.max() < 0.1:
            raise UsageError(f"--hint {opt.hint}: the drawing has no lines (it is all black); draw white "
                             "lines on black")
        return control.hint_of_drawing(hint).to(device)
    files = [opt.hint_from]
    if os.path.isdir(opt.hint_from):
        files = data.list_images(opt.hint_from)[:opt.n]
    if not files:
        raise UsageError(f"--hint-from {opt.hint_from}: the folder holds no .jpg or .png images; give a "
                         "photo or a folder of photos")
    photos = torch.stack([read_image(f, "--hint-from", size, opt.crop) for f in files])
    say(f"hints: the edges of {util.plural(len(files), 'photo')} from {opt.hint_from}")
    return control.edges(data.to_float(photos, device))


def load_mask(opt, size, device):
    """--mask -> (1, 1, size, size): 1 where --init is kept, 0 where the model fills in."""
    fill = torch.zeros(size, size)
    if opt.mask in MASKS:
        top, bottom, left, right = (round(f * size) for f in MASKS[opt.mask])
        fill[top:bottom, left:right] = 1
    else:
        fill = (read_image(opt.mask, "--mask", size, opt.crop).float().mean(0) > 127.5).float()  # white
        if fill.sum() == 0:
            raise UsageError(f"--mask {opt.mask}: has no white pixels, so nothing would be filled in")
        (mw, mh), (iw, ih) = (Image.open(f).size for f in (opt.mask, opt.init))
        if (mw, mh) != (iw, ih):
            say(f"note: --mask is {mw}x{mh} and --init {iw}x{ih}: the mask lines up only if drawn on the "
                "same frame")
    return (1 - fill).view(1, 1, size, size).to(device)


# --prompt: plain words -> CelebA attributes, a parser, not a language model (which would be a dependency and
# a download). Per attribute, besides its name in words: the words for it present | absent.
PHRASES = """
5_o_Clock_Shadow: five o clock shadow, stubble
Arched_Eyebrows
Attractive: beautiful, handsome
Bags_Under_Eyes: bags under the eyes
Bald
Bangs: fringe
Big_Lips: full lips
Big_Nose: large nose
Black_Hair: black haired
Blond_Hair: blond, blonde, blonde hair
Blurry: blurred, out of focus | sharp
Brown_Hair: brown haired, brunette
Bushy_Eyebrows: thick eyebrows
Chubby: plump
Double_Chin
Eyeglasses: glasses, spectacles, sunglasses
Goatee
Gray_Hair: grey hair, gray haired, grey haired, white hair
Heavy_Makeup: makeup, make up
High_Cheekbones
Male: man, men, boy, guy, gentleman, he | woman, women, female, girl, lady, she
Mouth_Slightly_Open: open mouth, mouth open, parted lips
Mustache: moustache
Narrow_Eyes: squinting
No_Beard: clean shaven, beardless | beard, bearded
Oval_Face
Pale_Skin: pale
Pointy_Nose: pointed nose
Receding_Hairline
Rosy_Cheeks
Sideburns
Smiling: smile, smiles, grinning, happy | serious, frowning
Straight_Hair
Wavy_Hair: wavy, curly hair, curly
Wearing_Earrings: earrings
Wearing_Hat: hat, cap
Wearing_Lipstick: lipstick
Wearing_Necklace: necklace
Wearing_Necktie: necktie, tie
Young: youthful | old, older, elderly, aged
"""
NEGATIONS = {"no", "not", "without", "non", "never"}
FILLER = {"a", "an", "the", "with", "and", "of", "face", "person", "portrait", "photo", "picture", "who",
          "is", "has", "having", "wearing", "in", "on", "her", "his", "very", "slightly", "some", "looking",
          "but", "or"}


def phrases():
    """{phrase: (attribute, 1 or 0)}: each attribute's name in words, and its PHRASES."""
    table = {}
    for line in PHRASES.strip().splitlines():
        name, _, text = line.partition(":")
        table[name.lower().replace("_", " ")] = (name, 1)
        for value, said in zip((1, 0), text.split("|")):
            table.update({p.strip(): (name, value) for p in said.split(",") if p.strip()})
    return table


def prompt_to_attrs(prompt):
    """--prompt -> (the --attrs it means, {attribute: its words}); it says what it understood."""
    asked, understood, ignored = parse_prompt(prompt)
    if not asked:
        raise UsageError(f"--prompt {prompt!r}: no word of it names a CelebA attribute; try words such as "
                         "smiling, man, woman, blond, glasses, beard, hat, young, old (or --attrs NAME=1)")
    say(f"prompt: understood {', '.join(f'{a}={v} ({understood[a]!r})' for a, v in asked.items())}; ignored "
        f"{', '.join(repr(w) for w in ignored) or 'nothing'}")
    return ",".join(f"{a}={v}" for a, v in asked.items()), understood


def parse_prompt(text):
    """Plain words -> ({attribute: 1 or 0}, {attribute: its words}, [ignored words]). A negation flips the
    next phrase of its clause (which ends at a comma, 'and', 'but', 'with'); two cancel."""
    table = phrases()
    text = text.lower().replace("n't", " not").replace("'", " ").replace("-", " ")
    words = re.sub(r"[,.;]", " , ", text).split()  # a comma, full stop or semicolon ends a clause
    asked = {}  # attribute -> 1 or 0
    understood = {}  # attribute -> the words that asked for it
    ignored = []
    negation = None  # the negation word waiting for the next phrase of its clause
    i = 0
    while i < len(words):
        n = next((n for n in (5, 4, 3, 2, 1) if " ".join(words[i:i + n]) in table), 0)
        if n == 0:  # a negation, a word between phrases, or one it does not know
            w = words[i]
            if w in NEGATIONS:
                negation = None if negation else w  # "not not smiling" is smiling
            elif w in (",", "and", "but", "with"):
                negation = None
            if w not in NEGATIONS | FILLER | {","}:
                ignored.append(w)
            i += 1
            continue
        said = " ".join(words[i:i + n])
        name, value = table[said]
        i += n
        if negation and said != "no beard":  # CelebA's own name, whose "no" is no negation
            value = 1 - value
            said = f"{negation} ... {said}"
        if name in asked and asked[name] != value:
            raise UsageError(f"--prompt asks for {name} both ways ({understood[name]!r} and {said!r}); ask "
                             "for one")
        asked[name] = value
        understood[name] = said
        negation = None
    return asked, understood, ignored

# -----------------------------------------------------------------------------
# figures: the forward and reverse process, attention, the schedules, the loss curve


def save_figure(opt, img, path=None, **kw):
    """A PIL image to `path` (default: --out), atomically."""
    if path is None:
        path = opt.out
    fmt = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    util.atomic_write(lambda tmp: img.save(tmp, format=fmt, **kw), path, "--out")
    say(f"wrote {path}")


def figure_forward(job):
    """One face (--init, or the model's) under q(x_t | x_0) at FORWARD_T: a row per schedule, one noise. A
    latent model noises the face's latent, and each x_t is shown decoded."""
    opt, T, device = job.opt, job.diffusion.T, job.device
    face = job.x_init
    if face is None:
        face = data.to_float(draw(job, 1), device)  # (1, 3, H, W)
    with job.ctx:
        x0 = job.first_stage.encode(face)  # (1, C, h, w): the face, or its latent
    ts = [round(t * (T - 1) / 999) for t in FORWARD_T]
    g = torch.Generator(device=device).manual_seed(opt.seed)
    noise = torch.randn(x0.shape, generator=g, device=device)
    rows = []
    for name in SCHEDULES:
        d = GaussianDiffusion(T, name)
        xt = torch.cat([d.q_sample(x0, torch.tensor([t], device=device), noise) for t in ts])
        with job.ctx:
            rows.append(data.to_uint8(job.to_images(xt)))
    scale = max(1, 64 // face.shape[-1])
    save_figure(opt, image_grid(rows, [f"t={t}" for t in ts], list(SCHEDULES), scale))


def figure_reverse(job):
    """x_t (the top row of each pair) and the x0 predicted from it (the bottom row) at about ten of the
    sampler's steps, then the sample, for --n faces; and a GIF of every step. A latent model's are decoded."""
    opt = job.opt
    frames = []  # (t, the chain after the step from t, x0_hat at t)

    def shown_as_image(x):
        with job.ctx:
            return data.to_uint8(job.to_images(x))

    x_T = job.noise(opt.n)
    x0 = draw(job, opt.n, x_T, callback=lambda t, x, x0_hat: frames.append((t, x, x0_hat)))
    inputs = [x_T] + [x for _, x, _ in frames[:-1]]  # x_t, the chain where the model is evaluated at t
    steps = [(f"t={t}", shown_as_image(x), shown_as_image(p)) for (t, _, p), x in zip(frames, inputs)]
    steps.append(("sample", x0, x0))
    shown = steps  # about ten of the steps, and the sample
    if len(steps) > 11:
        shown = [steps[round(i * (len(steps) - 2) / 9)] for i in range(10)] + steps[-1:]
    scale = max(1, 64 // x0.shape[-1])
    n = len(x_T)
    rows = [torch.stack([s[k][i] for s in shown]) for i in range(n) for k in (1, 2)]
    stem, ext = os.path.splitext(opt.out)
    strip = opt.out
    if ext.lower() == ".gif":  # --out names the animation: the strip goes beside it
        strip = stem + ".png"
    save_figure(opt, image_grid(rows, [s[0] for s in shown], ["x_t", "x0_hat"] * n, scale), strip)
    gif = [image_grid([x, p], [label] + [""] * (n - 1), ["x_t", "x0_hat"], scale) for label, x, p in steps]
    save_figure(opt, gif[0], stem + ".gif", save_all=True, append_images=gif[1:],
                duration=[100] * (len(gif) - 1) + [2000], loop=0)


@torch.no_grad()
def attention_maps(job, x_T, timesteps):
    """Sample one face from x_T (1, C, H, W), recording at `timesteps` the finest attention weights (the mean
    over layers and heads) of each of QUERIES. -> (the face (1, 3, H, W) uint8, maps (Q, len(timesteps), r,
    r), each a distribution over the r x r positions of the model's finest attention)."""
    r = max(job.net.cfg.attn_res)
    queries = [round(y * (r - 1)) * r + round(x * (r - 1)) for y, x in QUERIES.values()]
    now = [None]
    maps = {t: [] for t in timesteps}
    def hook(module, inputs, output):
        x = inputs[0]
        if x.shape[-1] == r and now[0] in maps:  # the first image (the conditional half under guidance)
            maps[now[0]].append(module.weights(x[:1].float())[0].mean(0)[queries])  # (Q, r*r)
    handles = [m.register_forward_hook(hook) for m in job.net.attention_layers()]  # the eager modules
    def model_at(x, t, *a, **kw):
        now[0] = int(t[0])
        return job.model(x, t, *a, **kw)
    try:
        face = draw(dataclasses.replace(job, model=model_at), 1, x_T)
    finally:
        for h in handles:
            h.remove()
    maps = torch.stack([torch.stack(maps[t]).mean(0) for t in timesteps], 1)
    return face, maps.view(len(queries), len(timesteps), r, r)


def figure_attention(job):
    """Where the finest self-attention (16x16 in the pixel presets, 8x8 in the latent ones) of an eye, the
    mouth and the background of a generated face looks at four timesteps: a row per query, red where it
    looks."""
    if job.cond_name == "text":
        return figure_words(job)
    ts = job.diffusion.timesteps(job.opt.sampler, job.steps, job.opt.spacing)
    ts = [ts[round(i * (len(ts) - 1) / 3)] for i in range(4)]
    x_T = job.noise(1)
    face, maps = attention_maps(job, x_T, ts)
    r = maps.shape[-1]
    say(f"attention: the model's finest self-attention, on its {r}x{r} feature map"
        + (f" of the {job.shape[1]}x{job.shape[2]} latent" if job.first_stage.factor > 1 else ""))
    scale = max(1, 128 // job.size)
    colours = torch.tensor([[0, 255, 255], [255, 255, 0], [0, 255, 0]], dtype=torch.uint8).view(3, 3, 1, 1)
    big = face[0].repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (3, S, S)
    rows = []
    for q, (y, x) in enumerate(QUERIES.values()):
        cells = [big.clone()]
        for m in maps[q]:
            cells.append(heat(big, m))
        cy, cx, half = round(y * (big.shape[1] - 1)), round(x * (big.shape[2] - 1)), max(2, scale)
        for c in cells:  # a box around the query position
            box = c[:, max(cy - half, 0):cy + half + 1, max(cx - half, 0):cx + half + 1]
            box[:, [0, -1], :], box[:, :, [0, -1]] = colours[q], colours[q]
        rows.append(torch.stack(cells))
    save_figure(job.opt, image_grid(rows, ["face"] + [f"t={t}" for t in ts], list(QUERIES), 1))


def heat(big, m):
    """A map m (r, r) over the face big (3, S, S) uint8: the face in grey, red where m is largest."""
    grey = big.float().mean(0, keepdim=True).expand(3, -1, -1)
    red = torch.tensor([255.0, 0, 0]).view(3, 1, 1)
    m = m / m.max().clamp_min(1e-12)
    a = F.interpolate(m[None, None], size=big.shape[1:], mode="bilinear")[0].clamp(0, 1)
    return (grey * (1 - a) + red * a).round().to(torch.uint8)


def word_maps(job, x_T):
    """Sample one face from x_T (1, C, H, W) under the job's caption, recording the cross-attention weights of
    every layer at every step, averaged over heads (each layer's map brought to the finest attention's r x r).
    -> (the face (1, 3, H, W) uint8, maps (L, r, r): the share of each position's attention that each token
    of the caption has, averaged over layers and steps)."""
    r = max(job.net.cfg.attn_res)
    maps = []
    def hook(module, inputs, output):
        x, (context, mask) = inputs  # the first image: the conditional half under guidance
        w = module.cross_weights(x[:1].float(), (context[:1].float(), mask[:1])).mean(1)[0]  # (HW, L)
        w = w.T.reshape(-1, 1, x.shape[-2], x.shape[-1])  # (L, 1, h, w)
        maps.append(F.interpolate(w, size=(r, r), mode="bilinear")[:, 0])  # (L, r, r)
    handles = [m.register_forward_hook(hook) for m in job.net.attention_layers()]  # the eager modules
    try:
        face = draw(job, 1, x_T)
    finally:
        for h in handles:
            h.remove()
    return face, torch.stack(maps).mean(0)


def figure_words(job):
    """A text model's --figure attention: where each word of --prompt looks, as prompt-to-prompt's figures
    show it (word_maps): the face, then a map per word."""
    if job.cond is None:
        raise UsageError("--figure attention of a text model shows where each word of --prompt looks: add "
                         "--prompt TEXT")
    face, maps = word_maps(job, job.noise(1))
    r = maps.shape[-1]
    ids = job.cond.tolist()
    words = [i for i, token in enumerate(ids) if token not in (texts.PAD, texts.BOS, texts.EOS)]
    say(f"attention: where each word looks, the cross-attention of {len(job.net.attention_layers())} layers "
        f"averaged over heads and {job.steps} steps, on a {r}x{r} map")
    scale = max(1, 128 // job.size)
    big = face[0].repeat_interleave(scale, 1).repeat_interleave(scale, 2)  # (3, S, S)
    row = torch.stack([big] + [heat(big, maps[i] - maps[i].min()) for i in words])  # each word: its own range
    vocab = job.net.cfg.vocab
    save_figure(job.opt, image_grid([row], ["face"] + [vocab[ids[i]] for i in words], [""], 1))


def figure_schedules(opt):
    """alpha_bar_t and log-SNR = log(alpha_bar / (1 - alpha_bar)) of each schedule, at the checkpoint's T."""
    T = util.load_checkpoint(opt.ckpt, parts=())["args"]["timesteps"] if opt.ckpt else 1000
    ds, ts = [GaussianDiffusion(T, name) for name in SCHEDULES], list(range(T))
    a = line_chart([(d.schedule, ts, d.alphas_cumprod.tolist()) for d in ds], "alpha_bar_t", "t")
    b = line_chart([(d.schedule, ts, torch.log(d.snr).tolist()) for d in ds], "log-SNR", "t")
    img = Image.new("RGB", (a.width + b.width, a.height), "white")
    img.paste(a, (0, 0))
    img.paste(b, (a.width, 0))
    save_figure(opt, img)


def figure_loss(opt):
    """The training and validation loss in the log.csv beside the checkpoint."""
    path = os.path.join(opt.ckpt if os.path.isdir(opt.ckpt) else os.path.dirname(opt.ckpt), "log.csv")
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
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    save_figure(opt, line_chart(series, f"loss ({run})", "step", log_y=True, size=(480, 300)))

# -----------------------------------------------------------------------------
# pictures: a labelled grid of images, a line chart (Pillow draws the few charts of the figures)


def image_grid(rows, col_labels, row_labels, scale):
    """rows: list of (k, 3, H, W) uint8 -> a PIL image, the images enlarged `scale` times (nearest),
    labelled."""
    # (3, h, w)
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=255)
    img = TF.to_pil_image(grid).resize((grid.shape[2] * scale, grid.shape[1] * scale), Image.NEAREST)
    left = 8 + 7 * max(map(len, row_labels))  # room for the row labels
    top = 16
    cell = img.height // len(rows)
    canvas = Image.new("RGB", (img.width + left, img.height + top), "white")
    canvas.paste(img, (left, top))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(col_labels):
        draw.text((left + (i + 0.5) * img.width / len(rows[0]), 8), text, fill="black", anchor="mm")
    for i, text in enumerate(row_labels):
        draw.text((4, top + (i + 0.5) * cell), text, fill="black", anchor="lm")
    return canvas


def nice_ticks(lo, hi, log=False):
    """Round values in [lo, hi]: multiples of 1, 2 or 5 times a power of ten (on a log axis, those values)."""
    if log:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        ticks = [v for v in (m * 10 ** k for k in decades for m in (1, 2, 5)) if lo <= v <= hi]
        if len(ticks) >= 3:
            return ticks
    raw = (hi - lo) / 5 or 1
    decade = 10 ** math.floor(math.log10(raw))
    step = min(m * decade for m in (1, 2, 5, 10) if m * decade >= raw)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def line_chart(series, title, xlabel, log_y=False, size=(360, 260)):
    """series: list of (name, xs, ys) -> a PIL line chart with axes, round ticks and a legend."""
    W, H, (l, r, t, b) = *size, (52, 10, 22, 34)  # plot area margins: left, right, top, bottom
    f, unf = (math.log10, lambda v: 10 ** v) if log_y else (lambda y: y, lambda v: v)
    xs, ys = [x for _, xx, _ in series for x in xx], [y for _, _, yy in series for y in yy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 0.05 * ((f(y1) - f(y0)) or 1)
    px = lambda x: l + (x - x0) / ((x1 - x0) or 1) * (W - l - r)
    py = lambda y: H - b - (f(y) - f(y0) + pad) / (f(y1) - f(y0) + 2 * pad) * (H - t - b)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([l, t, W - r, H - b], outline="black")
    for xv in nice_ticks(x0, x1):
        d.text((px(xv), H - b + 4), f"{xv:g}", fill="black", anchor="mt")
    for yv in nice_ticks(unf(f(y0) - pad), unf(f(y1) + pad), log_y):
        d.line([l - 3, py(yv), l, py(yv)], fill="black")
        d.text((l - 5, py(yv)), f"{yv:.4g}", fill="black", anchor="rm")
    d.text((W / 2, 4), title, fill="black", anchor="mt")
    d.text(((l + W - r) / 2, H - 4), xlabel, fill="black", anchor="mb")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (name, xx, yy) in enumerate(series):
        points = [(px(x), py(y)) for x, y in zip(xx, yy)]
        if len(points) > 1:
            d.line(points, fill=colours[i % 4], width=2)
        else:
            d.ellipse([*points[0], *points[0]], outline=colours[i % 4])
        d.text((W - r - 6, t + 6 + 12 * i), name, fill=colours[i % 4], anchor="ra")
    return img


if __name__ == "__main__":
    main()
