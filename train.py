"""
Train a DDPM on CelebA. One GPU, many (torchrun), MPS or CPU.

    python train.py --data data --size 64 --epochs 100
    torchrun --nproc_per_node=8 train.py --data data --size 64 --epochs 100
    python train.py --resume --out out         # continue the run in out/ (every setting from out/ckpt.pt)
    python train.py --bench --compile          # img/s, TFLOP/s and MFU on synthetic data

Everything random in step s (the batch order, flips, t, noise) is drawn from a generator seeded with
(seed, s) for the whole global batch, and each rank takes its slice. So a resumed run repeats the
uninterrupted one, and N GPUs train on exactly what one GPU at the same --batch-size would.

Under torchrun, whatever the ranks must agree on is decided once and sent to all of them: the seed and
the end step of a --minutes run (with every re-plan) come from rank 0, and the run stops at the same
step on every rank when any of them is signalled or the loss stops being finite.
"""
import argparse
import copy
import csv
import dataclasses
import functools
import math
import os
import shlex
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode
import torchvision

import data
import unet
from diffusion import OBJECTIVES, SCHEDULES, GaussianDiffusion
from sample import (CKPT_FORMAT, DEFAULT_ETA, CheckpointError, DEFAULT_SAMPLER, DEFAULT_STEPS, USER_ERRORS, Parser, UsageError, WriteError, atomic_write, autocast,
                    check_writable, load_checkpoint, model_from_checkpoint, non_negative, pick_device, positive, random_seed, real, remove_stale_temporaries, save_checkpoint, synchronize)

# dense bf16 tensor-core peak (TFLOP/s) by device name; the first match wins. --peak-tflops overrides.
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250), ("A100", 312),
               ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125)]
# flags that may differ from the checkpoint on --resume; every other setting is the checkpoint's
RESUME_MAY_CHANGE = ("data", "cache_dir", "epochs", "max_steps", "log_every", "sample_every", "sample_steps", "sample_n",
                     "eval_every", "eval_images", "ckpt_every", "out", "device", "precision", "compile", "channels_last",
                     "grad_checkpoint", "peak_tflops", "eval_bpd")
NOT_FROM_CHECKPOINT = ("resume", "overwrite", "dry_run", "bench", "bench_steps", "download", "bpd", "bpd_t", "x0_error")
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it


def int_list(s):
    """argparse type: comma-separated positive integers, e.g. 1,2,2,2."""
    try:
        v = tuple(int(x) for x in s.split(","))
    except ValueError:
        v = ()
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,2,2,2, got {s!r}")
    return v


def drop_rate(s):
    """argparse type for --p-drop-attr: 'uniform' or a probability."""
    if s == "uniform":
        return s
    v = float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be 'uniform' or in [0, 1], got {s}")
    return v


def add_attribute_flags(p):
    g = p.add_argument_group("attribute conditioning (sample with sample.py --attrs Smiling=1 --guidance W)")
    g.add_argument("--attrs", default=None, help="condition on CelebA attributes from the annotation file: 'all' or names, "
                   "e.g. Smiling,Male,Eyeglasses (default: an unconditional model)")
    g.add_argument("--p-uncond", type=real, default=0.1, help="probability that an image's whole condition is dropped "
                   "(trains the unconditional model that classifier-free guidance needs)")
    g.add_argument("--p-drop-attr", type=drop_rate, default="uniform",
                   help="probability that each attribute is dropped on its own, so that any subset can be asked for: a number, or "
                        "'uniform': a rate drawn from U(0, 1) per image, which makes the number of specified attributes uniform on 0..K")


def make_parser():
    p = Parser(description="Train a DDPM (denoising diffusion) on CelebA faces.",
               epilog="--resume takes every setting from the checkpoint, --data included. Only these may be given "
                      "again with other values: " + ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
                      + " (--data: a moved copy of the same images). Any other flag that contradicts the checkpoint is refused.")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="CelebA root (torchvision or Kaggle layout) or a folder of images")
    g.add_argument("--download", action="store_true", help="try torchvision's CelebA download into --data if no images are there (needs pip install gdown)")
    g.add_argument("--size", type=positive(int), default=64, help="image size; also picks the U-Net preset (32, 64, 128, 256)")
    g.add_argument("--crop", default="auto", choices=data.CROPS, help="auto: the DDIM CelebA box for 178x218 images, else a centre square")
    g.add_argument("--cache-dir", default=None, help="where decoded images are cached (default: $XDG_CACHE_HOME or ~/.cache, then ddpm-faces)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    g = p.add_argument_group("model (defaults come from the --size preset)")
    g.add_argument("--ch", type=positive(int), default=None, help="base channel count")
    g.add_argument("--ch-mult", type=int_list, default=None, help="channel multiplier per level, e.g. 1,2,2,2,4")
    g.add_argument("--num-res-blocks", type=positive(int), default=None, help="residual blocks per level")
    g.add_argument("--attn-res", type=int_list, default=None, help="feature-map sizes with self-attention, e.g. 16")
    g.add_argument("--dropout", type=real, default=None, help="dropout in the residual blocks")
    g = p.add_argument_group("diffusion")
    g.add_argument("--timesteps", type=positive(int), default=1000, help="T, the number of diffusion steps")
    g.add_argument("--schedule", default="linear", choices=SCHEDULES, help="beta schedule")
    g.add_argument("--objective", default="eps", choices=OBJECTIVES, help="what the network predicts")
    g.add_argument("--min-snr-gamma", type=positive(float), default=None, help="min-SNR-gamma loss weighting, e.g. 5 (off unless given)")
    add_attribute_flags(p)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive(int), default=100, help="passes over the training split")
    g.add_argument("--max-steps", type=positive(int), default=None, help="stop after this many steps in all (overrides --epochs)")
    g.add_argument("--minutes", type=positive(float), default=None,
                   help="fit the whole run into N minutes: measure img/s over the first steps, then choose the steps, "
                        "warm-up, LR decay and EMA decay for that budget (instead of --epochs/--max-steps)")
    g.add_argument("--batch-size", type=positive(int), default=128, help="global batch size, split over the GPUs")
    g.add_argument("--lr", type=positive(float), default=2e-4, help="peak AdamW learning rate")
    g.add_argument("--warmup", type=non_negative, default=5000, help="linear learning-rate warm-up steps, at most a tenth of the run")
    g.add_argument("--lr-decay", default="constant", choices=["constant", "cosine"],
                   help="learning rate after the warm-up: constant (the DDPM paper) or a cosine decay to 0 at the last step; "
                        "--minutes makes it cosine unless given")
    g.add_argument("--weight-decay", type=real, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=positive(float), default=1.0, help="clip the gradient norm to this")
    g.add_argument("--ema-decay", type=real, default=0.9999, help="EMA decay (with warm-up min(decay, (1+s)/(10+s)))")
    g.add_argument("--seed", type=random_seed, default=None, help="random seed (default: drawn at random and printed)")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision; auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU/MPS")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format")
    g.add_argument("--grad-checkpoint", default="auto", choices=["auto", "on", "off"],
                   help="recompute each U-Net block in backward (less memory, ~1/3 more compute); auto: on only when "
                        "the measured activation memory of a batch would not fit the device")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--out", default="out", help="folder for checkpoints, sample grids and log.csv")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds one, replacing it")
    g.add_argument("--log-every", type=positive(int), default=100, help="print a progress line every N steps")
    g.add_argument("--sample-every", type=non_negative, default=5000, help="sample grid from fixed noise with the EMA weights every N steps (0: never)")
    g.add_argument("--sample-steps", type=positive(int), default=DEFAULT_STEPS, help=f"model evaluations of the default sampler ({DEFAULT_SAMPLER}, eta {DEFAULT_ETA:g}) for those grids")
    g.add_argument("--sample-n", type=positive(int), default=64, help="images in those grids")
    g.add_argument("--eval-every", type=non_negative, default=5000, help="validation loss every N steps (0: never)")
    g.add_argument("--eval-images", type=positive(int), default=1024, help="validation images per evaluation")
    g.add_argument("--eval-bpd", type=non_negative, default=0,
                   help="also estimate the validation bits/dim (DDPM eq. 5) from this many stratified random t per image (0: off)")
    g.add_argument("--bpd", type=positive(int), default=None,
                   help="evaluate, do not train: the checkpoint's bits/dim bound over all T steps on this many validation "
                        "images (T model calls each), with --resume naming the checkpoint")
    g.add_argument("--bpd-t", type=non_negative, default=0,
                   help="with --bpd: an unbiased estimate from this many stratified random t per image instead of all T (0: all T)")
    g.add_argument("--x0-error", type=positive(int), default=None,
                   help="evaluate, do not train: the checkpoint's error in predicting x0 at 14 timesteps on this many validation "
                        "images, beside the best linear (Wiener) denoiser's, with --resume naming the checkpoint")
    g.add_argument("--ckpt-every", type=non_negative, default=5000, help="write ckpt.pt in --out every N steps (0: only at the end)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run from its checkpoint: a path, or no value for ckpt.pt in --out. Every setting comes "
                        "from the checkpoint; see the list below for the flags that may change")
    g.add_argument("--dry-run", action="store_true", help="2 steps at a small batch, then one eval, sample grid and checkpoint: checks a setup quickly")
    g = p.add_argument_group("benchmark")
    g.add_argument("--bench", action="store_true", help="time training steps on synthetic data and print img/s, TFLOP/s, MFU")
    g.add_argument("--bench-steps", type=positive(int), default=20, help="timed steps for --bench")
    g.add_argument("--peak-tflops", type=positive(float), default=None, help="the device's peak TFLOP/s for MFU (default: from a table)")
    return p


def get_args(argv=None):
    """-> (args, the set of flags given on the command line)."""
    args = make_parser().parse_args(argv)
    quiet = make_parser()
    for action in quiet._actions:  # parse again with no defaults: what is left was typed by the user
        action.default = argparse.SUPPRESS
    return args, set(vars(quiet.parse_args(argv)))

# -----------------------------------------------------------------------------
# small pieces


def model_config(args):
    return unet.preset(args.size, ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
                       attn_res=args.attn_res, dropout=args.dropout)


def lr_at(step, args, total):
    """Linear warm-up over args.warmup_steps, then constant or a cosine decay that reaches 0 at step `total`."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_decay == "cosine" and math.isfinite(total):
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup_steps) / max(1, total - args.warmup_steps)))
    return args.lr


def condition(attrs, gen, args, shard, batch):
    """Condition dropout for classifier-free guidance ([CFG] Algorithm 1, line 3): this rank's (B/world, K) uint8 0/1
    attributes -> floats in {+1 present, -1 absent, 0 unspecified}. Drawn for the whole global batch of `batch`
    images, of which this rank takes its shard, like every other draw of the step."""
    K, device = attrs.shape[1], attrs.device
    rate = torch.rand(batch, 1, generator=gen, device=device) if args.p_drop_attr == "uniform" else args.p_drop_attr
    keep = torch.rand(batch, K, generator=gen, device=device) >= rate  # each attribute on its own
    keep &= torch.rand(batch, 1, generator=gen, device=device) >= args.p_uncond  # the whole condition
    return (attrs.float() * 2 - 1) * keep[shard]


def fused_adamw(device):
    """Whether AdamW runs fused (the whole update in a few kernels): on GPUs."""
    return device.type == "cuda"


@torch.no_grad()
def update_ema(ema_params, params, step, decay):
    # ema = decay * ema + (1 - decay) * param, in one foreach kernel, as torch.optim.swa_utils'
    # get_ema_multi_avg_fn does. AveragedModel.update_parameters itself is not used: it reads its step
    # counter on the host every call, a GPU sync per step. Here the warm-up decay is a Python float.
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1.0 - d)


def train_step(fwd, diffusion, x0, t, noise, opt, scaler, ctx, params, ema_params, step, args):
    """One optimisation step on the L_simple loss; returns the loss as a tensor (no host sync)."""
    with ctx:
        loss = diffusion.training_losses(fwd, x0, t, noise).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # so that clipping sees the true gradient under fp16
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)  # foreach where the device has it
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    update_ema(ema_params, params, step, args.ema_decay)
    return loss.detach()


def activation_bytes_per_image(model, diffusion, size, device, ctx):
    """Bytes that autograd keeps for backward per image: the slope between forwards of 1 and 2 images."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    def measure(b):
        seen = set(params)
        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                measure.total += t.untyped_storage().nbytes()
            return t
        measure.total = 0
        x = torch.randn(b, 3, size, size, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            diffusion.training_losses(model, x, torch.zeros(b, dtype=torch.long, device=device), x)
        return measure.total
    return measure(2) - measure(1)


def device_memory(device):
    """Bytes a training run may use on `device`: on a GPU, what is free (other processes and MIG slices
    excluded) plus what this process already holds, within its set_per_process_memory_fraction; on the
    CPU, the memory the OS has available."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)  # torch >= 2.7
        return min(free + torch.cuda.memory_reserved(device), fraction * total)
    try:
        with open("/proc/meminfo") as f:  # Linux: MemAvailable counts reclaimable page cache
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_bytes(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_value(v):
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

# -----------------------------------------------------------------------------


def main(argv=None):
    args, given = get_args(argv)
    try:
        code = train(args, given)
    except (data.DataError, *USER_ERRORS) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training started (while decoding, say)
        print("interrupted before training started; nothing to save", file=sys.stderr)
        sys.exit(130)
    if code:
        sys.exit(code)


def train(args, given):
    env = setup(args, given)  # devices, processes, resume, checks: everything that needs no data
    try:
        return run_phases(args, given, env)
    finally:  # every exit, errors included: leave the process group cleanly
        if env.ddp and dist.is_initialized():
            dist.destroy_process_group()


def run_phases(args, given, env):
    if args.bench:
        run = build(args, env, None)
        return bench(args, run, env)
    if args.bpd:
        return evaluate_bpd(args, env)
    if args.x0_error:
        return evaluate_x0_error(args, env)
    if args.minutes and not env.ckpt and not args.dry_run and not given & {"ch", "batch_size"}:
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):  # timing draws no seeded randomness
            fit_model_to_minutes(args, env)
    faces, val, run_val_cond = load_data(args, env)
    run = build(args, env, faces)
    run.val_cond = run_val_cond
    if run.step >= run.total:
        env.log(f"nothing to do: the checkpoint is at step {run.step} and the run ends at step {run.total}; "
                "raise --max-steps or --epochs to train further")
        return 0
    return train_loop(args, env, run, val)

# -----------------------------------------------------------------------------
# phase 1: processes, devices, resume and every check that needs no data


def setup(args, given):
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    env = SimpleNamespace(ddp=ddp, rank=rank, world=world, master=rank == 0, ckpt=None, t_start=time.time(),
                          log=print if rank == 0 else (lambda *a, **k: None))
    if args.resume:
        resume_args(args, given, env)
    check_args(args, given, env)
    env.device = pick_device(args.device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if ddp:
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")
        # decisions travel as CPU tensors through a gloo group: agreeing on them never waits for the GPU
        env.ctrl = dist.new_group(backend="gloo") if env.device.type != "cpu" else dist.group.WORLD
    env.precision, env.ctx = autocast(env.device, args.precision)
    check_model_fits(args, env)
    torch.backends.cudnn.benchmark = True
    if args.seed is None:  # drawn on rank 0: every rank must shuffle with the same seed
        args.seed = int(from_rank0(env, int.from_bytes(os.urandom(4), "little") % 2**31))
    torch.manual_seed(args.seed + rank)  # dropout; all data randomness comes from a generator seeded per step
    env.log(f"device {env.device} x {world} process{'es' if world > 1 else ''}, precision {env.precision}, seed {args.seed}")
    return env


def check_model_fits(args, env):
    """Refuse, before anything is allocated, a model whose weights and optimizer state alone exceed the memory."""
    cfg = unet.config_from_dict(env.ckpt["model_args"]) if env.ckpt else model_config(args)
    with torch.device("meta"):  # shapes only: no memory, no time
        params = unet.UNet(cfg).num_params()
    need, available = 20 * params, device_memory(env.device) if env.device.type != "mps" else math.inf
    if need > available:
        raise UsageError(f"the model has {params / 1e6:,.0f}M parameters, whose weights, gradients, Adam moments and EMA need "
                         f"{fmt_bytes(need)}, more than the {fmt_bytes(available)} available on {env.device.type}: use a smaller --ch "
                         f"(the --size {args.size} preset has {unet.preset(args.size).ch})")


def from_rank0(env, value):
    """Rank 0's `value` (a number) on every rank."""
    if not env.ddp:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(t, 0, group=env.ctrl)
    return t.item()


def on_any_rank(env, flag):
    """True on every rank when `flag` is true on at least one."""
    if not env.ddp:
        return bool(flag)
    t = torch.tensor([float(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.ctrl)
    return t.item() > 0


def resume_args(args, given, env):
    """--resume: every setting comes from the checkpoint; a given flag that contradicts it is refused."""
    path = os.path.join(args.out, "ckpt.pt") if args.resume == "latest" else args.resume
    env.ckpt = load_checkpoint(path)
    for weights in ("model", "ema"):  # config, weights and EMA fit together (checked on the meta device)
        model_from_checkpoint(env.ckpt, path, weights, device="meta")
    if not all(k in env.ckpt for k in ("args", "optimizer", "scaler", "step")):
        raise CheckpointError(f"{path} lacks the optimizer state or step that a resume needs (written by another version?); "
                              "sample from it with sample.py, or start a new run")
    if "out" not in given and args.resume != "latest":  # --resume PATH continues in the checkpoint's folder
        args.out = os.path.dirname(path) if not os.path.isdir(path) else path
    saved = env.ckpt["args"]
    for k, v in saved.items():
        if k in NOT_FROM_CHECKPOINT or k == "out" or not hasattr(args, k):
            continue
        mine = getattr(args, k)
        same = (tuple(mine) if isinstance(mine, (list, tuple)) else mine) == (tuple(v) if isinstance(v, (list, tuple)) else v)
        if k in given and k not in RESUME_MAY_CHANGE and not same:
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"{flag} {fmt_value(mine)} contradicts the checkpoint's {fmt_value(v)} ({path}); "
                             f"drop {flag} to continue the run, or start a new run in another --out")
        if k not in given:
            setattr(args, k, tuple(v) if isinstance(v, list) else v)
    if "epochs" in given and "max_steps" not in given:  # extending by epochs: the saved --max-steps no longer applies
        args.max_steps = None
    args.warmup_steps = saved.get("warmup_steps", saved["warmup"])
    env.log(f"resuming from {path} at step {env.ckpt['step']}")


def check_args(args, given, env):
    """Everything that can be checked without data, so that a mistake costs seconds, not a decode."""
    if args.bpd_t and not args.bpd:
        raise UsageError("--bpd-t sets how --bpd estimates the bound; add --bpd N (images), or drop --bpd-t")
    if "minutes" in given and given & {"max_steps", "epochs"}:
        raise UsageError("--minutes chooses the number of steps itself; drop --max-steps/--epochs, or drop --minutes")
    if args.minutes and args.minutes > 525_600:
        raise UsageError(f"--minutes {args.minutes:g} is more than a year (525,600 minutes); give the budget in minutes, e.g. --minutes 30")
    if args.minutes and args.dry_run:
        raise UsageError("--dry-run runs 2 steps to check a setup; it does not go with --minutes: drop one of them")
    if args.lr > 1:
        raise UsageError(f"--lr {args.lr:g}: above 1, each AdamW step moves the weights by more than their size and the run "
                         "diverges; diffusion U-Nets train at about 1e-4 to 5e-4 (default 2e-4)")
    if args.lr > 1e-2 and not args.resume:
        env.log(f"note: --lr {args.lr:g} is far above what diffusion U-Nets train with (1e-4 to 5e-4): expect the loss to diverge")
    if args.attrs is not None and not args.attrs.strip(","):
        raise UsageError("--attrs '': name the attributes to condition on, e.g. --attrs Smiling,Male, or 'all'; "
                         "drop --attrs for an unconditional model")
    loose = [f for f in ("p_uncond", "p_drop_attr") if f in given and not args.attrs]
    if loose:
        raise UsageError(f"--{loose[0].replace('_', '-')} sets how a conditional model drops its attributes; add --attrs NAMES, "
                         f"or drop --{loose[0].replace('_', '-')}")
    if args.sample_n > 1024:
        raise UsageError(f"--sample-n {args.sample_n}: a training grid shows at most 1,024 images; for more samples, "
                         "run python sample.py CKPT --n N --out-dir DIR on the checkpoint")
    if args.eval_bpd >= args.timesteps:
        raise UsageError(f"--eval-bpd {args.eval_bpd}: there are only T-1 = {args.timesteps - 1} timesteps to draw from; "
                         f"use at most {args.timesteps - 1}")
    if args.minutes and not args.resume and "lr_decay" not in given:
        args.lr_decay = "cosine"  # a budgeted run ends with its learning rate at 0
    if not 0 <= args.p_uncond <= 1:
        raise UsageError(f"--p-uncond {args.p_uncond}: must be a probability in [0, 1], e.g. 0.1")
    if args.weight_decay < 0:
        raise UsageError(f"--weight-decay {args.weight_decay:g}: must be >= 0 (0, the default, is none)")
    if not 0 <= args.ema_decay < 1:
        raise UsageError(f"--ema-decay {args.ema_decay}: must be in [0, 1), e.g. 0.9999")
    if args.sample_steps > args.timesteps:
        raise UsageError(f"--sample-steps {args.sample_steps} is more than --timesteps {args.timesteps}; lower it")
    if args.dry_run:
        if args.resume:
            raise UsageError("--dry-run writes its checkpoint into --out, so it does not go with --resume; dry-run into another --out")
        args.batch_size = min(args.batch_size, 4 * env.world)  # small enough to run anywhere
        args.sample_steps, args.sample_n, args.eval_images = min(args.sample_steps, 10), min(args.sample_n, 4), min(args.eval_images, 16)
    if args.batch_size % env.world:
        raise UsageError(f"--batch-size {args.batch_size} must be divisible by the number of processes ({env.world})")
    try:
        unet.check_config(model_config(args))
    except ValueError as e:
        raise UsageError(str(e))
    if args.bench:
        return
    args.data = os.path.abspath(os.path.expanduser(args.data))  # so that --resume works from any folder
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: is a file; give a folder for checkpoints and samples")
    if not args.resume and os.path.exists(ckpt_path) and not args.overwrite:
        raise UsageError(f"--out {args.out} already holds a run ({ckpt_path}); continue it with "
                         f"python train.py --resume --out {shlex.quote(args.out)}, pick another --out, or pass --overwrite to replace it")
    if env.master:
        check_writable(args.out, "--out")
        if remove_stale_temporaries(args.out):
            env.log(f"removed the temporary files that a killed run left in {args.out}")

MIN_STEPS = 1500  # the 32x32 runs on a 2-core CPU (REPORT sec. 3) made faces with the default sampler from about here


def time_step(args, env, cfg, batch, steps=1):
    """-> (seconds, model): the fastest of `steps` training steps of a fresh `cfg` model at `batch` images (after
    one warm-up step), on synthetic data. Under fork_rng: timing draws none of the run's seeded randomness."""
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        model = unet.UNet(cfg).to(env.device)
        x0, t = torch.zeros(batch, 3, cfg.image_size, cfg.image_size, device=env.device), torch.zeros(batch, dtype=torch.long, device=env.device)
        opt, diffusion = torch.optim.AdamW(model.parameters(), lr=0.0), GaussianDiffusion(args.timesteps).to(env.device)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            t0 = time.time()
            with env.ctx:
                diffusion.training_losses(model, x0, t, x0).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(env.device)
            times.append(time.time() - t0)
    return max(min(times[1:]), 1e-9), model


def estimate_run(args, env, n_images):
    """A new run on a CPU or MPS, before decoding: how long it will take, from one timed step of its model at one
    image scaled to the batch; past a day, the command that gives faces on this machine in 30 minutes. Never refuses."""
    steps = args.max_steps or args.epochs * (n_images // args.batch_size)
    per_step = args.batch_size // env.world * time_step(args, env, model_config(args), 1)[0]
    line = (f"estimate: {steps:,} steps of {args.batch_size} images at ~{per_step:.1f} s each on this {env.device.type}: "
            f"about {fmt_time(steps * per_step)}")
    if steps * per_step > 86400:
        line += (f"; far beyond a day here. For faces on this machine in 30 minutes: "
                 f"python train.py --data {shlex.quote(args.data)} --size 32 --minutes 30")
    env.log(line)


def fit_model_to_minutes(args, env):
    """--minutes without --ch or --batch-size: the --size preset's width and batch, halved together (128 -> 64 -> 32)
    until the budget holds MIN_STEPS training steps, so that a short run on a small machine still ends with faces.
    The smallest candidate is timed first; a wider one is timed only if its FLOPs say that it could fit.
    A narrowed model gets dropout 0 (a run of a few epochs does not overfit)."""
    base = model_config(args)
    candidates = [(base.ch >> k, args.batch_size >> k) for k in range(3) if base.ch >> k >= 32 and args.batch_size >> k >= 8 * env.world]
    budget = args.minutes * 60

    def cfg_of(ch):
        return dataclasses.replace(base, ch=ch, dropout=base.dropout if ch == base.ch else 0.0)

    def seconds_per_step(ch, batch, steps):
        return time_step(args, env, cfg_of(ch), batch // env.world, steps)

    def flops(model):
        with FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, 3, args.size, args.size, device=env.device), torch.zeros(1, dtype=torch.long, device=env.device)).sum().backward()
        return fc.get_total_flops()

    small_ch, small_b = candidates[-1]
    small_s, small_model = seconds_per_step(small_ch, small_b, 2)
    small_flops, choice = flops(small_model), len(candidates) - 1
    for i, (ch, b) in enumerate(candidates[:-1]):
        guess = small_s * flops(unet.UNet(cfg_of(ch)).to(env.device)) * b / (small_flops * small_b)
        if budget / guess >= MIN_STEPS and budget / seconds_per_step(ch, b, 2)[0] >= MIN_STEPS:
            choice = i
            break
    choice = torch.tensor([choice], device=env.device)
    if env.ddp:
        dist.broadcast(choice, 0)  # every rank builds rank 0's choice
    ch, b = candidates[choice.item()]
    args.ch, args.batch_size, args.dropout = ch, b, cfg_of(ch).dropout
    env.log(f"--minutes {args.minutes:g}: --ch {ch} --batch-size {b} --dropout {args.dropout:g}, the widest of "
            f"{', '.join(f'{c}/{bb}' for c, bb in candidates)} (channels/batch) whose speed here leaves "
            f">= {MIN_STEPS:,} steps in the budget" + (" (none does: the smallest)" if choice.item() == len(candidates) - 1
                                                         and budget / small_s < MIN_STEPS else ""))

# -----------------------------------------------------------------------------
# phase 2: data, model, optimizer


def load_data(args, env):
    """-> (training images (N, 3, H, W) uint8, validation batch in [-1, 1] on the device or None)."""
    if args.download and env.master:
        try:
            data.select(args.data)
        except data.DataError:
            data.download(args.data, env.log)
    if env.master and not (env.ckpt or args.minutes or args.dry_run) and env.device.type != "cuda":
        estimate_run(args, env, len(data.select(args.data, "train", log=lambda *a: None)["files"]))
    if env.ddp and not env.master:
        dist.barrier()  # rank 0 decodes and writes the cache first; the others then load it
    faces = data.load(args.data, args.size, "train", args.crop, args.cache_dir, log=env.log, min_images=args.batch_size, attrs=args.attrs)
    if env.ddp and env.master:
        dist.barrier()
    saved = env.ckpt and env.ckpt.get("train_images")
    if saved and saved != len(faces["images"]):
        raise UsageError(f"--data {args.data} has {len(faces['images']):,} training images, the checkpoint's run had {saved:,}; "
                         "resume with the same data")
    val, val_cond = None, None
    if env.master and args.eval_every > 0:
        try:
            v = data.load(args.data, args.size, "valid", args.crop, args.cache_dir, log=env.log, attrs=args.attrs)
            val = data.to_float(v["images"][: args.eval_images], env.device)
            val_cond = v["cond"][: args.eval_images].to(env.device).float() * 2 - 1 if args.attrs else None  # every attribute given
        except data.DataError as e:
            env.log(f"no validation loss: {e}")
    return faces, val, val_cond


def build(args, env, faces):
    """Model, EMA, optimizer and scaler (from the checkpoint when resuming), the memory plan, the schedule.
    faces: data.load's dict (None for --bench)."""
    ckpt, device = env.ckpt, env.device
    attrs = tuple(faces["cond_names"] or ()) if faces is not None else ()
    cfg = unet.config_from_dict(ckpt["model_args"]) if ckpt else dataclasses.replace(model_config(args), attrs=attrs)
    if faces is not None and tuple(cfg.attrs) != attrs:
        raise UsageError(f"the checkpoint's model is conditioned on {','.join(cfg.attrs) or 'nothing'}, but --data {args.data} "
                         f"gives {','.join(attrs) or 'no attributes'}; resume with the run's data")
    model = unet.UNet(cfg).to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    diffusion = GaussianDiffusion(args.timesteps, args.schedule, args.objective, args.min_snr_gamma).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=fused_adamw(device))
    scaler = torch.amp.GradScaler(device.type, enabled=env.precision == "fp16")  # a no-op unless fp16
    run = SimpleNamespace(cfg=cfg, model=model, ema=ema, opt=opt, scaler=scaler, diffusion=diffusion, step=0, elapsed=0.0,
                          loss_sum=torch.zeros((), device=device), loss_n=0)  # the training loss since the last multiple of --log-every
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        own = {k: opt.param_groups[0][k] for k in ("fused", "foreach", "capturable")}  # chosen for this device
        opt.load_state_dict(ckpt["optimizer"])  # brings the saved run's choices along with the moments
        for group in opt.param_groups:
            group.update(own)  # a CPU checkpoint resumed on a GPU gets the fused update back
        scaler.load_state_dict(ckpt["scaler"])
        run.step, run.elapsed = ckpt["step"], ckpt.get("elapsed", 0.0)
        run.loss_sum, run.loss_n = torch.tensor(ckpt.get("loss_sum", 0.0), device=device), ckpt.get("loss_n", 0)
        if ckpt.get("world_size") == env.world:  # the dropout RNG continues exactly on the same world size
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        else:
            torch.manual_seed(args.seed + env.rank + run.step)
    env.log(f"model: {model.num_params() / 1e6:.2f}M parameters, {cfg}")
    resident = faces is not None and data.fits_on_gpu(faces["images"].nbytes, device)
    plan_memory(args, env, run, args.batch_size, faces["images"].nbytes if resident else 0)
    run.fwd = torch.compile(model) if args.compile else model  # state dicts come from `model`: no _orig_mod. prefix
    run.fwd = DDP(run.fwd, device_ids=[device.index] if device.type == "cuda" else None) if env.ddp else run.fwd
    if faces is not None:
        faces, cond = faces["images"], faces["cond"]
        run.batches = data.Batches(faces, args.batch_size, device, args.seed, env.rank, env.world, flip=not args.no_flip, attrs=cond,
                                   resident=resident)
        run.total = args.max_steps or run.batches.steps_per_epoch * args.epochs
        run.probe = None
        if args.minutes and not args.max_steps:
            run.total = math.inf  # until plan_minutes has measured the speed
        if args.dry_run:
            run.total = run.step + 2
        if not ckpt:  # the warm-up never takes more than a tenth of the run; kept from the start on resume
            args.warmup_steps = min(args.warmup, run.total // 10)
        if math.isinf(run.total):
            args.warmup_steps = args.warmup  # provisional: plan_minutes sets it with the number of steps
            env.log(f"data: {len(faces):,} training images, {run.batches.steps_per_epoch:,} steps per epoch at batch {args.batch_size}; "
                    f"the number of steps is chosen after timing the first ones, to end within --minutes {args.minutes:g}")
        else:
            env.log(f"data: {len(faces):,} training images, {run.batches.steps_per_epoch:,} steps per epoch at batch {args.batch_size}, "
                    f"{run.total:,} steps in all, lr warm-up over {args.warmup_steps:,} steps"
                    + (f" (--warmup {args.warmup} is more than a tenth of the run)" if args.warmup_steps < args.warmup and not ckpt else ""))
    return run


def plan_memory(args, env, run, batch, resident_bytes=0):
    """Estimate a training step's memory from the activations autograd keeps per image (measured on 1 and
    2 images); with --grad-checkpoint auto turn activation checkpointing on only when the batch needs it,
    and refuse a batch that cannot fit with a one-line error that names one that can. resident_bytes: the
    training images that will live on the device."""
    model, b = run.model, batch // env.world
    if env.device.type == "mps":  # unified memory, no figure to plan against
        model.grad_checkpoint = args.grad_checkpoint == "on"
        return
    available = device_memory(env.device)
    # fp32 weights, grads, two Adam moments and the EMA; DDP adds its gradient buckets (one more copy of the grads)
    state = (20 + 4 * env.ddp) * model.num_params() + resident_bytes
    budget = 0.85 * available
    for on in ([False, True] if args.grad_checkpoint == "auto" else [args.grad_checkpoint == "on"]):
        model.grad_checkpoint = on
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):  # leaves the RNG as it was
            per_image = 1.25 * activation_bytes_per_image(model, run.diffusion, run.cfg.image_size, env.device, env.ctx)  # +25%: backward's temporaries
        need = state + b * per_image
        if need <= budget:
            env.log(f"memory: ~{fmt_bytes(need)} for a batch of {b} (of {fmt_bytes(available)} on {env.device.type}); "
                    f"activation checkpointing {'on' if on else 'off'}")
            return
    fit = int((budget - state) / per_image) * env.world
    hint = f"use --batch-size {fit} or less" if fit >= env.world else "use a smaller model (--ch)"
    hint += ", or --grad-checkpoint auto" if args.grad_checkpoint == "off" else ""
    raise UsageError(f"a batch of {batch} needs ~{fmt_bytes(need)}, more than the {fmt_bytes(available)} available "
                     f"on {env.device.type}: {hint}")

# -----------------------------------------------------------------------------
# phase 3: the training loop ([DDPM] Algorithm 1) and what it does every so often


def train_loop(args, env, run, val):
    signals, handlers = [], {s: signal.getsignal(s) for s in EXIT_CODES}
    # one process on a CPU or MPS: a step can take minutes, so a signal also cuts the step itself short
    at_once = not env.ddp and env.device.type != "cuda" and not args.compile
    watch_signals(signals, [run.ema, run.model] if at_once else [run.ema])
    catch_signals(signals, env, at_once)
    try:
        return loop(args, env, run, val, signals)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def loop(args, env, run, val, signals):
    device, diffusion = env.device, run.diffusion
    b = run.batches.batch_size // env.world
    shard = slice(env.rank * b, (env.rank + 1) * b)
    gen = torch.Generator(device=device)  # re-seeded every step: all of a step's randomness
    log_rows = open_log(args, env, run)
    params, ema_params = list(run.model.parameters()), list(run.ema.parameters())
    t_log, step_log = time.time(), run.step
    t0 = time.time() - run.elapsed  # elapsed time continues across resumes
    run.model.train()
    while run.step < run.total:
        rng = torch.get_rng_state()  # dropout's; restored if a signal cuts this step short
        lr = lr_at(run.step, args, run.total)
        for group in run.opt.param_groups:
            group["lr"] = lr
        gen.manual_seed((args.seed * 1_000_003 + run.step) % 2**64)
        x0, attrs = run.batches.get(run.step, gen)  # (B/world, 3, H, W) in [-1, 1]; Algorithm 1, line 2
        t = torch.randint(0, args.timesteps, (run.batches.batch_size,), generator=gen, device=device)[shard]  # line 3
        noise = torch.randn((run.batches.batch_size, *x0.shape[1:]), generator=gen, device=device)[shard]  # line 4
        if args.channels_last:
            x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        fwd = run.fwd if attrs is None else functools.partial(run.fwd, attrs=condition(attrs, gen, args, shard, run.batches.batch_size))
        try:
            loss = train_step(fwd, diffusion, x0, t, noise, run.opt, run.scaler, env.ctx, params, ema_params, run.step, args)  # line 5
        except Interrupted:  # the half-done step is dropped: weights, optimizer and RNG stay those of run.step
            run.opt.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            periodic(args, env, run, val, log_rows, False, signals[0], t0)
            return EXIT_CODES[signals[0]]
        run.loss_sum, run.loss_n, run.step = run.loss_sum + loss, run.loss_n + 1, run.step + 1
        if math.isinf(run.total):
            plan_minutes(args, env, run, val)  # --minutes: times the first steps, then sets run.total

        last = run.step == run.total
        stop = (signals or [signal.SIGTERM])[0] if on_any_rank(env, signals) else None  # every rank stops after the same step
        if run.step % args.log_every == 0 or last or stop or run.step in (1, 10):
            now = time.time()
            run.elapsed = now - t0
            if run.probe and not last and not math.isinf(run.total) and run.step < 0.95 * run.total:
                replan_minutes(args, env, run, val, (run.step - step_log) / (now - t_log))
            progress(args, env, run, reduce_loss(env, run.loss_sum) / run.loss_n, (run.step - step_log) / (now - t_log), log_rows)
            if run.step % args.log_every == 0:  # the loss column averages the steps since the last multiple of --log-every
                run.loss_sum, run.loss_n = torch.zeros((), device=device), 0
            t_log, step_log = now, run.step
        t_extra = time.time()
        periodic(args, env, run, val, log_rows, last, stop, t0)
        if stop:
            break
        t_log += time.time() - t_extra  # evaluation, sampling and saving are not training time
    return EXIT_CODES[stop] if stop else 0


def plan_minutes(args, env, run, val):
    """--minutes: time the steps after the first two (compilation, autotuning); once at least 10 steps and 10 s
    are timed, choose how many steps fit what is left of the budget, then the warm-up, LR decay and EMA for them."""
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    now = time.time()
    if run.probe is None:
        run.probe = (run.step + 2, None)
    if run.step == run.probe[0]:
        run.probe = (run.step, now)
    if run.probe[1] is None:
        return
    steps, seconds = run.step - run.probe[0], now - run.probe[1]
    total = fit_minutes(args, env, run, val, steps / seconds if steps >= 10 and seconds >= min(10, 1.2 * args.minutes) else 0)
    if total is None:
        return
    run.total = args.max_steps = total
    args.warmup_steps = min(args.warmup, run.total // 10)
    run.ema_given = args.ema_decay
    args.ema_decay = min(args.ema_decay, 1 - 10 / run.total)  # the average spans about the last tenth of the run
    env.log(f"--minutes {args.minutes:g}: {steps / seconds * args.batch_size:,.1f} img/s measured: {run.total:,} steps in all "
            f"({run.total / run.batches.steps_per_epoch:.2f} epochs), lr warm-up {args.warmup_steps:,} steps then "
            f"{args.lr_decay} decay to step {run.total:,}, EMA decay {args.ema_decay:.5f}")
    if run.total < MIN_STEPS and env.master:
        per_step, final = budget_terms(args, val, steps / seconds)
        need = time.time() - env.t_start + (MIN_STEPS - run.step) * per_step + final
        env.log(f"--minutes {args.minutes:g}: {run.total:,} steps are too few for faces, so the samples will be mostly noise; "
                f"faces come from about {MIN_STEPS:,} steps, which take about --minutes {math.ceil(need / 60)} on this machine")


def replan_minutes(args, env, run, val, rate):
    """--minutes, at every progress line: if the speed changed (a busy machine), move the end to keep the budget."""
    total = fit_minutes(args, env, run, val, rate)
    if total is not None and abs(total - run.total) > 0.02 * run.total:
        run.total = args.max_steps = total
        args.ema_decay = min(run.ema_given, 1 - 10 / total)
        env.log(f"--minutes {args.minutes:g}: now {rate * args.batch_size:,.1f} img/s; the run will end at step {total:,} "
                f"(EMA decay {args.ema_decay:.5f})")


def fit_minutes(args, env, run, val, rate):
    """The step at which the run ends on time at `rate` training steps/s, or None before there is a rate.
    Rank 0's clock and rate decide, and every rank gets its answer: all end at the same step."""
    end = 0
    if env.master and rate > 0:
        per_step, final = budget_terms(args, val, rate)
        end = run.step + max(1, int(0.98 * (args.minutes * 60 - (time.time() - env.t_start) - final) / per_step))
    end = int(from_rank0(env, end))
    return end if end > 0 else None


def budget_terms(args, val, rate):
    """-> (seconds per training step at `rate` steps/s with its share of the periodic grids and evaluations, seconds
    of the grid and evaluation at the end). A forward pass costs about a third of a training step."""
    grid = (args.sample_n * args.sample_steps if args.sample_every else 0) / (3 * args.batch_size * rate)
    evaluate = (len(val) * (2 + args.eval_bpd) if val is not None else 0) / (3 * args.batch_size * rate)
    per_step = 1 / rate + (grid / args.sample_every if args.sample_every else 0) + (evaluate / args.eval_every if val is not None else 0)
    return per_step, grid + evaluate


class Interrupted(Exception):
    """A signal arrived in a long phase (a CPU step, a sample grid, an evaluation), which is cut short."""


def watch_signals(signals, models):
    """Make the models' long phases end soon after a signal: every U-Net block checks for one before its forward,
    and every trained parameter after its gradient is accumulated in backward."""
    def check(*_):
        if signals:
            raise Interrupted
    for model in models:
        for block in [*model.down, *model.mid, *model.up]:
            block.register_forward_pre_hook(check)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(check)


def catch_signals(signals, env, at_once):
    """Ctrl-C (SIGINT) and SIGTERM (sent by Slurm, Kubernetes, `timeout`) end the run after the current
    step (during it, with `at_once`), with a checkpoint. A second Ctrl-C quits at once, without one; a second
    SIGTERM is ignored (Slurm signals every process and torchrun forwards the signal again: neither should
    cut the checkpoint short)."""
    def handler(signum, frame):
        if not signals:
            env.log(f"\n{signal.Signals(signum).name}: stopping {'now' if at_once else 'after this step'} and writing a checkpoint; "
                    "press Ctrl-C again to quit at once without one", flush=True)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signals.append(signum)
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def reduce_loss(env, loss_sum):
    """The mean over ranks of the summed loss, read on the host (here, every --log-every steps)."""
    if env.ddp:
        dist.all_reduce(loss_sum)
        loss_sum = loss_sum / env.world
    return loss_sum.item()


def open_log(args, env, run):
    """log.csv in --out, rewritten on resume to the rows up to the checkpoint's step (so each step appears once)."""
    if not env.master:
        return None
    path = os.path.join(args.out, "log.csv")
    header = ["step", "epoch", "loss", "val_loss", "lr", "img_per_s", "elapsed_s", "val_bpd"]
    rows = []
    if env.ckpt and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= run.step]
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
    atomic_write(write, path, "--out")
    return SimpleNamespace(path=path)


def append_log(log_rows, row):
    try:
        with open(log_rows.path, "a", newline="") as f:
            csv.writer(f).writerow(row)
    except OSError as e:
        raise WriteError(f"cannot write {log_rows.path} ({e.strerror}); free some space or pass another --out")


def progress(args, env, run, loss_avg, steps_per_s, log_rows):
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if not math.isfinite(loss_avg):
        good = f"the last good checkpoint {ckpt_path} was kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
        raise SystemExit(f"error: the loss became {loss_avg} by step {run.step}: training diverged; {good}. "
                         "Lower --lr, raise --warmup, or use --precision bf16/fp32.")
    ips = steps_per_s * run.batches.batch_size
    epoch = run.step // run.batches.steps_per_epoch
    lr = run.opt.param_groups[0]["lr"]
    eta = "timing the first steps" if math.isinf(run.total) else fmt_time((run.total - run.step) / max(steps_per_s, 1e-9))
    total = "?" if math.isinf(run.total) else run.total
    env.log(f"epoch {epoch} | step {run.step}/{total} | loss {loss_avg:.4f} | {ips:,.1f} img/s | lr {lr:.2e} | ETA {eta}")
    if log_rows:
        append_log(log_rows, [run.step, epoch, f"{loss_avg:.6f}", "", f"{lr:.3e}", f"{ips:.1f}", f"{run.elapsed:.1f}"])


def periodic(args, env, run, val, log_rows, last, stop, t0):
    """Rank 0's work every so often: validation loss, the fixed-noise sample grid, the checkpoint."""
    save = (args.ckpt_every > 0 and run.step % args.ckpt_every == 0) or last or stop
    loss_sum = reduce_loss(env, run.loss_sum) if save else None  # on every rank: the checkpoint carries the running loss
    if not env.master:
        return
    step, epoch = run.step, run.step // run.batches.steps_per_epoch
    try:  # a signal cuts these short (stopping skips them): the checkpoint below matters more
        if val is not None and (step % args.eval_every == 0 or last) and not stop:
            vl = val_loss(args, env, run, val)
            bpd = val_bpd(args, env, run, val) if args.eval_bpd else None
            env.log(f"step {step} | val loss {vl:.4f}" + (f" | val bits/dim <= {bpd:.3f} (estimate)" if bpd else "") + f" ({len(val)} images)")
            append_log(log_rows, [step, epoch, "", f"{vl:.6f}", "", "", f"{time.time() - t0:.1f}", f"{bpd:.4f}" if bpd else ""])
        if ((args.sample_every > 0 and step % args.sample_every == 0) or (last and (args.sample_every > 0 or args.dry_run))) and not stop:
            env.log(f"step {step} | samples {sample_grid(args, env, run)}")
    except Interrupted:
        run.model.train()
        env.log(f"step {step} | evaluation or sample grid cut short by the signal")
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if save:
        run.elapsed = time.time() - t0
        saved = checkpoint(args, env, run, ckpt_path, loss_sum)
        env.log(f"step {step} | checkpoint {ckpt_path}" if saved else f"step {step} | weights not finite: checkpoint not written")
        if last and args.minutes:
            env.log(f"--minutes {args.minutes:g}: the run took {fmt_time(time.time() - env.t_start)} from start to this checkpoint")
        if stop:
            name = signal.Signals(stop).name
            env.log(f"interrupted by {name} at step {step}" + (f"; checkpoint written. Continue with: python train.py --resume --out {shlex.quote(args.out)}" if saved else ""))


def checkpoint(args, env, run, path, loss_sum):
    sd = run.model.state_dict()
    if not all(torch.isfinite(v).all() for v in sd.values()):
        return False
    save_checkpoint(dict(format=CKPT_FORMAT, args=vars(args), model_args=unet.config_dict(run.cfg), model=sd,
                         ema=run.ema.state_dict(), optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict(),
                         step=run.step, epoch=run.step // run.batches.steps_per_epoch, world_size=env.world,
                         loss_sum=loss_sum, loss_n=run.loss_n,  # the running mean of the loss goes on after a resume
                         train_images=len(run.batches.images), elapsed=run.elapsed,
                         rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if env.device.type == "cuda" else None)),
                    path)
    return True


def sample_grid(args, env, run):
    """The EMA model's samples from the same noise at every call (x_T and, for a stochastic sampler, every z),
    drawn in batches of the training batch."""
    x_T = torch.randn(args.sample_n, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)).to(env.device)
    g, b = torch.Generator(device=env.device).manual_seed(args.seed + 1), args.batch_size // env.world
    with env.ctx:
        x = torch.cat([run.diffusion.sample(run.ema, x.shape, DEFAULT_SAMPLER, args.sample_steps, DEFAULT_ETA, g, x_T=x, device=env.device)
                       for x in x_T.split(b)])
    path = os.path.join(args.out, f"samples_{run.step:07d}.png")
    nrow = int(math.sqrt(args.sample_n) + 0.5)
    atomic_write(lambda tmp: torchvision.utils.save_image((x.float() + 1) / 2, tmp, format="png", nrow=nrow), path, "--out")
    return path


@torch.no_grad()
def val_loss(args, env, run, val):
    run.model.eval()
    g = torch.Generator(device=env.device).manual_seed(0)  # the same t and noise at every evaluation
    losses, b = [], run.batches.batch_size // env.world
    for i in range(0, len(val), b):
        x0 = val[i:i + b]
        t = torch.randint(0, args.timesteps, (len(x0),), generator=g, device=env.device)
        model = run.model if run.val_cond is None else functools.partial(run.model, attrs=run.val_cond[i:i + b])
        with env.ctx:
            losses.append(run.diffusion.training_losses(model, x0, t, torch.randn(x0.shape, generator=g, device=env.device)))
    run.model.train()
    return torch.cat(losses).mean().item()

@torch.no_grad()
def val_bpd(args, env, run, val):
    """A cheap unbiased estimate of the EMA model's bound on the validation images: --eval-bpd random t per image."""
    g = torch.Generator(device=env.device).manual_seed(0)
    b = run.batches.batch_size // env.world
    with env.ctx:
        parts = [run.diffusion.bits_per_dim(run.ema if run.val_cond is None else functools.partial(run.ema, attrs=run.val_cond[i:i + b]),
                                            val[i:i + b], g, t_samples=args.eval_bpd)["total"] for i in range(0, len(val), b)]
    return torch.cat(parts).mean().item()


def evaluate_bpd(args, env):
    """--bpd N: the checkpoint's (EMA) variational bound, [DDPM] eq. 5, on N validation images: over every t, or
    estimated from --bpd-t K stratified t per image (K + 1 model calls instead of T)."""
    if env.ckpt is None:
        raise UsageError("--bpd evaluates a checkpoint: name it with --resume PATH (or --resume --out DIR)")
    model, diffusion = model_from_checkpoint(env.ckpt, args.resume)
    if args.bpd_t >= diffusion.T:
        raise UsageError(f"--bpd-t {args.bpd_t}: the model has only T-1 = {diffusion.T - 1} timesteps to draw from; "
                         f"use at most {diffusion.T - 1}, or 0 for every t")
    images = data.load(args.data, args.size, "valid", args.crop, args.cache_dir, log=env.log)["images"][: args.bpd]
    model, diffusion = model.to(env.device).eval(), diffusion.to(env.device)
    g, parts, b, t0 = torch.Generator(device=env.device).manual_seed(0), [], min(args.batch_size, 256), time.time()
    for i in range(0, len(images), b):
        with env.ctx:
            parts.append(diffusion.bits_per_dim(model, data.to_float(images[i:i + b], env.device), g, t_samples=args.bpd_t or None))
        env.log(f"bpd: {i + len(parts[-1]['total'])}/{len(images)} images, {fmt_time(time.time() - t0)}")
    r = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    se = r["total"].std().item() / math.sqrt(len(r["total"])) if len(r["total"]) > 1 else float("nan")
    how = f"an unbiased estimate from {args.bpd_t} stratified t per image" if args.bpd_t else "every t"
    env.log(f"bits/dim on {len(images)} validation images (step {env.ckpt['step']}, T={diffusion.T}, {how}): "
            f"prior L_T {r['prior'].mean():.4f} + sum of L_t {r['vb'].mean():.4f} + decoder L_0 {r['decoder'].mean():.4f} "
            f"= {r['total'].mean():.4f} +- {se:.4f}")
    return 0


@torch.no_grad()
def evaluate_x0_error(args, env):
    """--x0-error N: the mean squared error of the EMA model's x0_hat at a range of t on N validation images, beside
    that of the best linear denoiser (the Wiener filter of the training images' mean and covariance: it is exact
    for Gaussian data, and any good model beats it). Where the model is worse, samplers inherit its errors."""
    if env.ckpt is None:
        raise UsageError("--x0-error evaluates a checkpoint: name it with --resume PATH (or --resume --out DIR)")
    model, diffusion = model_from_checkpoint(env.ckpt, args.resume)
    model, diffusion, device = model.to(env.device).eval(), diffusion.to(env.device), env.device
    load = lambda split, n: data.to_float(data.load(args.data, args.size, split, args.crop, args.cache_dir, log=env.log)["images"][:n], device)
    train_x, x0 = load("train", 20_000).flatten(1).double(), load("valid", args.x0_error)  # (N, D), (n, 3, H, W)
    mean = train_x.mean(0)
    lam, U = torch.linalg.eigh(torch.cov((train_x - mean).T))  # the covariance's eigenvalues (D,) and vectors (D, D)
    lam, g, b = lam.clamp(min=0), torch.Generator(device=device).manual_seed(0), min(args.batch_size, 256)
    env.log(f"x0 error on {len(x0)} validation images (step {env.ckpt['step']}, EMA weights, objective {diffusion.objective})")
    env.log("    t  alpha_bar  model MSE  clipped  best linear  clipped/linear  share |x0_hat| > 1")
    for f in (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.0):
        i = round(f * (diffusion.T - 1))
        t = torch.full((len(x0),), i, device=device, dtype=torch.long)
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g, device=device))
        with env.ctx:
            out = torch.cat([model(xt[j:j + b], t[j:j + b]).float() for j in range(0, len(x0), b)])
        x0_hat, _ = diffusion.predict_x0_eps(out, xt, t)
        a, s = diffusion.sqrt_alphas_cumprod[i].item(), diffusion.sqrt_one_minus_alphas_cumprod[i].item()
        # Wiener: x0 = mean + C a (a^2 C + s^2 I)^-1 (x_t - a mean), applied in the covariance's eigenbasis
        wiener = (mean + ((xt.flatten(1).double() - a * mean) @ U * (a * lam / (a * a * lam + s * s))) @ U.T).view_as(x0)
        mse = lambda p: (p.float() - x0).pow(2).mean().item()
        env.log(f"{i:5d}  {a * a:9.2e}  {mse(x0_hat):9.4f}  {mse(x0_hat.clamp(-1, 1)):7.4f}  {mse(wiener):11.4f}  "
                f"{mse(x0_hat.clamp(-1, 1)) / mse(wiener):14.2f}  {(x0_hat.abs() > 1).float().mean().item():19.3f}")
    return 0

# -----------------------------------------------------------------------------


def bench(args, run, env):
    """Time training steps on synthetic data; count FLOPs with torch.utils.flop_counter."""
    device, model, diffusion = env.device, run.model, run.diffusion
    b = args.batch_size // env.world
    x0 = torch.rand(b, 3, args.size, args.size, device=device) * 2 - 1
    x0 = x0.contiguous(memory_format=torch.channels_last) if args.channels_last else x0
    params = list(model.parameters())
    ema_params = [p.detach().clone() for p in params]
    args.warmup_steps = 0

    def one_step(step):
        t = torch.randint(0, args.timesteps, (b,), device=device)
        train_step(run.fwd, diffusion, x0, t, torch.randn_like(x0), run.opt, run.scaler, env.ctx, params, ema_params, step, args)

    # model FLOPs: forward + backward of the eager model, per process (recomputation is not counted)
    gc, model.grad_checkpoint = model.grad_checkpoint, False
    with FlopCounterMode(display=False) as fc:
        with env.ctx:
            diffusion.training_losses(model, x0, torch.randint(0, args.timesteps, (b,), device=device), torch.randn_like(x0)).mean().backward()
    model.grad_checkpoint = gc
    run.opt.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    t_c = time.time()
    for i in range(3):  # warm-up: compilation, cudnn autotuning
        one_step(i)
    synchronize(device)
    env.log(f"bench: warm-up {time.time() - t_c:.1f}s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for i in range(args.bench_steps):
        one_step(3 + i)
    synchronize(device)
    dt = (time.time() - t0) / args.bench_steps
    # host time: issuing one step's kernels from an idle device. Near the step time, the GPU waits on Python
    # and the launches (too small a batch per GPU): --compile, or a larger batch, is what helps then.
    host = []
    for i in range(3):
        t1 = time.time()
        one_step(3 + args.bench_steps + i)
        host.append(time.time() - t1)
        synchronize(device)
    tflops = flops / dt / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = args.peak_tflops or next((p for k, p in PEAK_TFLOPS if k in name), None) if device.type == "cuda" else args.peak_tflops
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
    env.log(f"bench: {name} | size {args.size} | batch {b}/process x {env.world} | {env.precision} | compile {args.compile} | "
            f"channels_last {args.channels_last} | activation checkpointing {model.grad_checkpoint}")
    env.log(f"bench: {b * env.world / dt:,.1f} img/s | {dt * 1e3:.1f} ms/step (host {min(host) * 1e3:.1f} ms to issue one"
            f"{', launch-bound' if min(host) > 0.8 * dt and device.type != 'cpu' else ''}) | peak memory {mem} | {flops / b / 1e9:.2f} GFLOP/img (fwd+bwd) | "
            f"{tflops:.2f} TFLOP/s/process" + (f" | MFU {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s" if peak else " | MFU n/a (pass --peak-tflops)"))
    return 0


if __name__ == "__main__":
    main()
