"""
Train a DDPM on CelebA. One GPU, many (torchrun), MPS or CPU.

    python train.py --data data --size 64 --epochs 100
    torchrun --nproc_per_node=8 train.py --data data --size 64 --epochs 100
    python train.py --data data --size 32 --minutes 30   # the run that fits in 30 minutes of this machine
    python train.py --resume --out out                   # continue the run in out/ (every setting from out/ckpt.pt)
    python train.py --bench --compile                    # img/s, TFLOP/s and MFU on synthetic data

The file reads like [DDPM] Algorithm 1: `train` sets up and runs `loop`, whose every step is `train_step`,
then `checkpoint`. After them come what the loop does every so often (progress, validation, sample grids,
signals), and the extras, each behind one call: --minutes planning, the memory plan, --bench, and the
evaluations of a checkpoint (--bpd, --x0-error). The flags come last.

Three objects carry a run: `cfg`, its settings (the flags, or the checkpoint's on --resume, resolved once
and never changed in place); `plan`, its schedule (steps, warm-up, EMA decay), which --minutes revises
once it has timed the first steps; `env`, the processes and the device. All three go into the checkpoint.

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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode
import torchvision

import data
import unet
from data import UsageError, WriteError, atomic_write, non_negative, positive, random_seed, real
from diffusion import DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, OBJECTIVES, SCHEDULES, GaussianDiffusion
from sample import (CKPT_FORMAT, ERRORS, CheckpointError, autocast, load_checkpoint, model_from_checkpoint, pick_device,
                    save_checkpoint, synchronize)

# flags that may differ from the checkpoint on --resume; every other setting is the checkpoint's
RESUME_MAY_CHANGE = ("data", "cache_dir", "epochs", "max_steps", "log_every", "sample_every", "sample_steps", "sample_n",
                     "eval_every", "eval_images", "ckpt_every", "out", "device", "precision", "compile", "channels_last",
                     "grad_checkpoint", "peak_tflops", "eval_bpd")
NOT_FROM_CHECKPOINT = ("resume", "overwrite", "dry_run", "bench", "bench_steps", "download", "bpd", "bpd_t", "x0_error")
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it
MIN_STEPS = 1500  # --minutes narrows the preset until this many steps fit (32x32 on a 2-core CPU: REPORT sec. 3)
FACE_STEPS = 1000  # with the lr --minutes scales up, 1,037 steps made faces there (det 0.914); fewer get a warning

# -----------------------------------------------------------------------------
# the run: main -> train -> loop -> train_step, then the checkpoint


def main(argv=None):
    args, given = get_args(argv)
    try:
        code = train(args, given)
    except ERRORS as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C before training started (while decoding, say)
        print("interrupted before training started; nothing to save", file=sys.stderr)
        sys.exit(130)
    if code:
        sys.exit(code)


def train(args, given):
    """The phases of a run. -> exit code."""
    cfg, env = setup(args, given)  # settings, processes, device and every check that needs no data
    try:
        if cfg.bench or cfg.bpd or cfg.x0_error:
            return bench(cfg, env) if cfg.bench else evaluate_bpd(cfg, env) if cfg.bpd else evaluate_x0_error(cfg, env)
        if cfg.minutes and not env.ckpt and not cfg.dry_run and not given & {"ch", "batch_size"}:
            cfg = fit_model_to_minutes(cfg, env, given)  # a model, batch and lr that leave MIN_STEPS steps in the budget
        faces, val = load_data(cfg, env)
        run = build(cfg, env, faces, val, given)
        if run.step >= run.plan.total:
            env.log(f"nothing to do: the checkpoint is at step {run.step} and the run ends at step {run.plan.total}; "
                    "raise --max-steps or --epochs to train further")
            return 0
        return train_loop(cfg, env, run)
    finally:  # every exit, errors included: leave the process group cleanly
        if env.ddp and dist.is_initialized():
            dist.destroy_process_group()


def loop(cfg, env, run, signals):
    """[DDPM] Algorithm 1: repeat { x_0 ~ q(x_0); t ~ U(0..T-1); eps ~ N(0, I); a gradient step on ||eps - eps_theta||^2 }."""
    device, diffusion = env.device, run.diffusion
    B = run.batches.batch_size  # the global batch; this rank computes its shard
    shard = slice(env.rank * B // env.world, (env.rank + 1) * B // env.world)
    gen = torch.Generator(device=device)  # re-seeded every step: all of a step's randomness
    log = open_log(cfg, env, run)
    params, ema_params = list(run.model.parameters()), list(run.ema.parameters())
    t0, t_log, step_log = time.time() - run.elapsed, time.time(), run.step  # elapsed time continues across resumes
    run.model.train()
    while run.step < run.plan.total:
        rng = torch.get_rng_state()  # dropout's; restored if a signal cuts this step short
        for group in run.opt.param_groups:
            group["lr"] = lr_at(run.step, cfg.lr, run.plan)
        gen.manual_seed((cfg.seed * 1_000_003 + run.step) % 2**64)
        x0, attrs = run.batches.get(run.step, gen)  # (B/world, 3, H, W) in [-1, 1]; Algorithm 1, line 2
        t = torch.randint(0, cfg.timesteps, (B,), generator=gen, device=device)[shard]  # line 3
        noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=device)[shard]  # line 4
        if cfg.channels_last:
            x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        fwd = run.fwd if attrs is None else functools.partial(run.fwd, attrs=condition(attrs, gen, cfg, shard, B, run.rare))
        try:
            loss = train_step(fwd, diffusion, x0, t, noise, run.opt, run.scaler, env.ctx, params, ema_params, run.step,
                              cfg.grad_clip, run.plan.ema_decay)  # line 5
        except Interrupted:  # the half-done step is dropped: weights, optimizer and RNG stay those of run.step
            run.opt.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            periodic(cfg, env, run, log, False, signals[0], t0)
            return EXIT_CODES[signals[0]]
        run.loss_sum, run.loss_n, run.step = run.loss_sum + loss, run.loss_n + 1, run.step + 1
        if math.isinf(run.plan.total):
            plan_minutes(cfg, env, run)  # --minutes: times the first steps, then sets the plan

        last = run.step == run.plan.total
        stop = (signals or [signal.SIGTERM])[0] if on_any_rank(env, signals) else None  # every rank stops after the same step
        if run.step % cfg.log_every == 0 or last or stop or run.step in (1, 10):
            now = time.time()
            run.elapsed = now - t0
            if run.probe and not last and not math.isinf(run.plan.total) and run.step < 0.95 * run.plan.total:
                replan_minutes(cfg, env, run, (run.step - step_log) / (now - t_log))
            progress(cfg, env, run, reduce_loss(env, run.loss_sum) / run.loss_n, (run.step - step_log) / (now - t_log), log)
            if run.step % cfg.log_every == 0:  # the loss column averages the steps since the last multiple of --log-every
                run.loss_sum, run.loss_n = torch.zeros((), device=device), 0
            t_log, step_log = now, run.step
        t_extra = time.time()
        periodic(cfg, env, run, log, last, stop, t0)
        if stop:
            return EXIT_CODES[stop]
        t_log += time.time() - t_extra  # evaluation, sampling and saving are not training time
    return 0


def train_step(fwd, diffusion, x0, t, noise, opt, scaler, ctx, params, ema_params, step, grad_clip, ema_decay):
    """One optimisation step on the L_simple loss ([DDPM] eq. 14), then the EMA; returns the loss as a tensor
    (no host sync)."""
    with ctx:
        loss = diffusion.training_losses(fwd, x0, t, noise).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # so that clipping sees the true gradient under fp16
    torch.nn.utils.clip_grad_norm_(params, grad_clip)  # foreach where the device has it
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    update_ema(ema_params, params, step, ema_decay)
    return loss.detach()


def lr_at(step, lr, plan):
    """Linear warm-up over plan.warmup steps, then constant or a cosine decay that reaches 0 at step plan.total."""
    if step < plan.warmup:
        return lr * (step + 1) / plan.warmup
    if plan.lr_decay == "cosine" and math.isfinite(plan.total):
        return lr * 0.5 * (1 + math.cos(math.pi * (step - plan.warmup) / max(1, plan.total - plan.warmup)))
    return lr


@torch.no_grad()
def update_ema(ema_params, params, step, decay):
    # ema = decay * ema + (1 - decay) * param, in one foreach kernel, as torch.optim.swa_utils'
    # get_ema_multi_avg_fn does. AveragedModel.update_parameters itself is not used: it reads its step
    # counter on the host every call, a GPU sync per step. Here the warm-up decay is a Python float.
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1.0 - d)


def condition(attrs, gen, cfg, shard, batch, rare):
    """Condition dropout for classifier-free guidance ([CFG] Algorithm 1, line 3): this rank's (B/world, K) uint8 0/1
    attributes -> floats in {+1 present, -1 absent, 0 unspecified}. Drawn for the whole global batch of `batch`
    images, of which this rank takes its shard, like every other draw of the step. With --p-drop-attr balanced, an
    attribute in its rarer state (`rare`, (K,): Eyeglasses=1, Young=0) is only dropped with the whole condition."""
    K, device = attrs.shape[1], attrs.device
    rate = torch.rand(batch, 1, generator=gen, device=device) if cfg.p_drop_attr in ("uniform", "balanced") else cfg.p_drop_attr
    keep = (torch.rand(batch, K, generator=gen, device=device) >= rate)[shard]  # each attribute on its own
    if cfg.p_drop_attr == "balanced":
        keep |= attrs == rare
    keep &= (torch.rand(batch, 1, generator=gen, device=device) >= cfg.p_uncond)[shard]  # the whole condition
    return (attrs.float() * 2 - 1) * keep


def checkpoint(cfg, env, run, path, loss_sum):
    """One self-describing file: the settings, the plan, the model config, the weights, the EMA, the optimizer,
    the step and the RNG; written atomically. Non-finite weights are not written (-> False)."""
    sd = run.model.state_dict()
    if not all(torch.isfinite(v).all() for v in sd.values()):
        return False
    save_checkpoint(dict(format=CKPT_FORMAT, args=vars(cfg), plan=dataclasses.asdict(run.plan), model_args=unet.config_dict(run.net),
                         model=sd, ema=run.ema.state_dict(), optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict(),
                         step=run.step, epoch=run.step // run.batches.steps_per_epoch, world_size=env.world,
                         train_images=len(run.batches.images), elapsed=run.elapsed,
                         loss_sum=loss_sum, loss_n=run.loss_n,  # the running mean of the loss goes on after a resume
                         rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if env.device.type == "cuda" else None)),
                    path)
    return True

# -----------------------------------------------------------------------------
# the objects of a run


@dataclass
class Env:
    """The processes and the device."""
    ddp: bool
    rank: int
    world: int
    master: bool
    log: object  # print on rank 0, a no-op elsewhere
    device: torch.device = None
    precision: str = None
    ctx: object = None  # the autocast context
    ctrl: object = None  # the gloo group through which the ranks agree (torchrun only)
    ckpt: dict = None  # the checkpoint a --resume continues
    t_start: float = None  # when the process began the run: --minutes budgets from here


@dataclass
class Plan:
    """The schedule: steps in all (inf until --minutes has timed the first steps), LR warm-up and decay, EMA decay,
    and the steps between sample grids."""
    total: float
    warmup: int
    lr_decay: str
    ema_decay: float
    grid_every: int = 0


@dataclass
class Run:
    """What the loop updates: the model and its EMA, the optimizer, the data, the plan and the counters."""
    net: unet.UNetConfig
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    diffusion: GaussianDiffusion
    fwd: torch.nn.Module  # the model as the step calls it: compiled and/or DDP-wrapped
    batches: data.Batches
    plan: Plan
    val: torch.Tensor = None  # validation images in [-1, 1] on the device (rank 0), or None
    val_cond: torch.Tensor = None  # their attributes, every one given, for a conditional model
    step: int = 0
    elapsed: float = 0.0
    loss_sum: torch.Tensor = None  # the training loss summed since the last multiple of --log-every
    loss_n: int = 0
    probe: tuple = None  # --minutes: (step, time) where the timing of steps began
    rare: torch.Tensor = None  # (K,) each attribute's rarer state in the training data (1: present is rarer)

# -----------------------------------------------------------------------------
# setup: the settings, the processes and the device, and every check that needs no data


def setup(args, given):
    """-> (cfg, env). cfg: the flags, or the checkpoint's settings on --resume, with what the run resolves before
    it starts (--dry-run's small batch, the cosine decay of --minutes, the data's absolute path, the seed)."""
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    env = Env(ddp, rank, world, rank == 0, print if rank == 0 else (lambda *a, **k: None), t_start=time.time())
    cfg = resumed(args, given, env) if args.resume else argparse.Namespace(**vars(args))
    check_args(cfg, given, env)
    new_minutes = cfg.minutes and not cfg.resume
    cfg = replace(cfg, data=os.path.abspath(os.path.expanduser(cfg.data)),  # so that --resume works from any folder
                  lr_decay="cosine" if new_minutes and "lr_decay" not in given else cfg.lr_decay,  # ends at 0
                  sample_every=None if new_minutes and "sample_every" not in given else cfg.sample_every,  # the plan's: 4 grids
                  sample_steps=min(cfg.sample_steps, cfg.timesteps))  # the default 20, or all T if fewer
    if cfg.dry_run:  # small enough to run anywhere
        cfg = replace(cfg, batch_size=min(cfg.batch_size, 4 * world), sample_steps=min(cfg.sample_steps, 10),
                      sample_n=min(cfg.sample_n, 4), eval_images=min(cfg.eval_images, 16))
    env.device = pick_device(cfg.device, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if ddp:
        dist.init_process_group("nccl" if env.device.type == "cuda" else "gloo")
        # decisions travel as CPU tensors through a gloo group: agreeing on them never waits for the GPU
        env.ctrl = dist.new_group(backend="gloo") if env.device.type != "cpu" else dist.group.WORLD
    env.precision, env.ctx = autocast(env.device, cfg.precision)
    check_model_fits(cfg, env)
    torch.backends.cudnn.benchmark = True
    if cfg.seed is None:  # drawn on rank 0: every rank must shuffle with the same seed
        cfg = replace(cfg, seed=int(from_rank0(env, int.from_bytes(os.urandom(4), "little") % 2**31)))
    torch.manual_seed(cfg.seed + rank)  # dropout; all data randomness comes from a generator seeded per step
    env.log(f"device {env.device} x {world} process{'es' if world > 1 else ''}, precision {env.precision}, seed {cfg.seed}")
    return cfg, env


def replace(cfg, **changes):
    """A copy of the settings with `changes`: settings are never changed in place."""
    return argparse.Namespace(**{**vars(cfg), **changes})


def resumed(args, given, env):
    """--resume: every setting comes from the checkpoint (env.ckpt); a given flag that contradicts it is refused."""
    path = os.path.join(args.out, "ckpt.pt") if args.resume == "latest" else args.resume
    env.ckpt = load_checkpoint(path)
    for weights in ("model", "ema"):  # config, weights and EMA fit together (checked on the meta device)
        model_from_checkpoint(env.ckpt, path, weights, device="meta")
    if not all(k in env.ckpt for k in ("args", "optimizer", "scaler", "step")):
        raise CheckpointError(f"{path} lacks the optimizer state or step that a resume needs (written by another version?); "
                              "sample from it with sample.py, or start a new run")
    cfg = vars(args).copy()
    if "out" not in given and args.resume != "latest":  # --resume PATH continues in the checkpoint's folder
        cfg["out"] = os.path.dirname(path) if not os.path.isdir(path) else path
    for k, v in env.ckpt["args"].items():
        if k in NOT_FROM_CHECKPOINT or k == "out" or k not in cfg:
            continue
        same = (tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k]) == (tuple(v) if isinstance(v, (list, tuple)) else v)
        if k in given and k not in RESUME_MAY_CHANGE and not same:
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"{flag} {fmt_value(cfg[k])} contradicts the checkpoint's {fmt_value(v)} ({path}); "
                             f"drop {flag} to continue the run, or start a new run in another --out")
        if k not in given:
            cfg[k] = tuple(v) if isinstance(v, list) else v
    if "epochs" in given and "max_steps" not in given:  # extending by epochs: the saved --max-steps no longer applies
        cfg["max_steps"] = None
    env.log(f"resuming from {path} at step {env.ckpt['step']}")
    return argparse.Namespace(**cfg)


def check_args(cfg, given, env):
    """Everything that can be checked without data, so that a mistake costs seconds, not a decode."""
    if cfg.bpd_t and not cfg.bpd:
        raise UsageError("--bpd-t sets how --bpd estimates the bound; add --bpd N (images), or drop --bpd-t")
    if "minutes" in given and given & {"max_steps", "epochs"}:
        raise UsageError("--minutes chooses the number of steps itself; drop --max-steps/--epochs, or drop --minutes")
    if cfg.minutes and cfg.minutes > 525_600:
        raise UsageError(f"--minutes {cfg.minutes:g} is more than a year (525,600 minutes); give the budget in minutes, e.g. --minutes 30")
    if cfg.minutes and cfg.dry_run:
        raise UsageError("--dry-run runs 2 steps to check a setup; it does not go with --minutes: drop one of them")
    if cfg.dry_run and cfg.resume:
        raise UsageError("--dry-run writes its checkpoint into --out, so it does not go with --resume; dry-run into another --out")
    if cfg.lr > 1:
        raise UsageError(f"--lr {cfg.lr:g}: above 1, each AdamW step moves the weights by more than their size and the run "
                         "diverges; diffusion U-Nets train at about 1e-4 to 5e-4 (default 2e-4)")
    if cfg.lr > 1e-2 and not cfg.resume:
        env.log(f"note: --lr {cfg.lr:g} is far above what diffusion U-Nets train with (1e-4 to 5e-4): expect the loss to diverge")
    check_attribute_flags(cfg, given)
    if cfg.weight_decay < 0:
        raise UsageError(f"--weight-decay {cfg.weight_decay:g}: must be >= 0 (0, the default, is none)")
    if not 0 <= cfg.ema_decay < 1:
        raise UsageError(f"--ema-decay {cfg.ema_decay}: must be in [0, 1), e.g. 0.9999")
    if cfg.sample_steps > cfg.timesteps and "sample_steps" in given:
        raise UsageError(f"--sample-steps {cfg.sample_steps} is more than --timesteps {cfg.timesteps}; lower it")
    if cfg.sample_n > 1024:
        raise UsageError(f"--sample-n {cfg.sample_n}: a training grid shows at most 1,024 images; for more samples, "
                         "run python sample.py CKPT --n N --out-dir DIR on the checkpoint")
    if cfg.eval_bpd >= cfg.timesteps:
        raise UsageError(f"--eval-bpd {cfg.eval_bpd}: there are only T-1 = {cfg.timesteps - 1} timesteps to draw from; "
                         f"use at most {cfg.timesteps - 1}")
    if cfg.batch_size % env.world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({env.world})")
    try:
        unet.check_config(model_config(cfg))
    except ValueError as e:
        field, message = e.args
        raise UsageError(f"--{'size' if field == 'image_size' else field.replace('_', '-')} {message}")
    if not cfg.bench:
        check_out(cfg, env)


def check_attribute_flags(cfg, given):
    if cfg.attrs is not None and not cfg.attrs.strip(","):
        raise UsageError("--attrs '': name the attributes to condition on, e.g. --attrs Smiling,Male, or 'all'; "
                         "drop --attrs for an unconditional model")
    loose = [f for f in ("p_uncond", "p_drop_attr", "attr_film") if f in given and not cfg.attrs]
    if loose:
        raise UsageError(f"--{loose[0].replace('_', '-')} sets how a conditional model drops its attributes; add --attrs NAMES, "
                         f"or drop --{loose[0].replace('_', '-')}")
    if not 0 <= cfg.p_uncond <= 1:
        raise UsageError(f"--p-uncond {cfg.p_uncond}: must be a probability in [0, 1], e.g. 0.1")


def check_out(cfg, env):
    """--out: a folder that can be written, and that holds no run unless this is its resume (or --overwrite)."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out}: is a file; give a folder for checkpoints and samples")
    if not cfg.resume and os.path.exists(ckpt_path) and not cfg.overwrite:
        raise UsageError(f"--out {cfg.out} already holds a run ({ckpt_path}); continue it with "
                         f"python train.py --resume --out {shlex.quote(cfg.out)}, pick another --out, or pass --overwrite to replace it")
    if env.master:
        data.check_writable(cfg.out, "--out")
        if data.remove_stale_temporaries(cfg.out):
            env.log(f"removed the temporary files that a killed run left in {cfg.out}")


def check_model_fits(cfg, env):
    """Refuse, before anything is allocated, a model whose weights and optimizer state alone exceed the memory."""
    net = unet.config_from_dict(env.ckpt["model_args"]) if env.ckpt else model_config(cfg)
    with torch.device("meta"):  # shapes only: no memory, no time
        params = unet.UNet(net).num_params()
    need, available = 20 * params, device_memory(env.device) if env.device.type != "mps" else math.inf
    if need > available:
        raise UsageError(f"the model has {params / 1e6:,.0f}M parameters, whose weights, gradients, Adam moments and EMA need "
                         f"{fmt_bytes(need)}, more than the {fmt_bytes(available)} available on {env.device.type}: use a smaller --ch "
                         f"(the --size {cfg.size} preset has {unet.preset(cfg.size).ch})")


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

# -----------------------------------------------------------------------------
# data, model, optimizer, plan


def load_data(cfg, env):
    """-> (data.load's dict of the training split, the validation images: (images in [-1, 1] on the device,
    their attributes or None), or None). The image count is checked against the batch before anything is decoded."""
    if cfg.download and env.master:
        try:
            data.select(cfg.data)
        except data.DataError:
            data.download(cfg.data, env.log)
    n = len(data.select(cfg.data, "train", log=lambda *a: None)["files"])
    if n < cfg.batch_size:
        raise UsageError(f"--data {cfg.data}: the train split has {n:,} images, fewer than --batch-size {cfg.batch_size}; lower --batch-size")
    if env.master and not (env.ckpt or cfg.minutes or cfg.dry_run) and env.device.type != "cuda":
        estimate_run(cfg, env, n)
    if env.ddp and not env.master:
        dist.barrier()  # rank 0 decodes and writes the cache first; the others then load it
    faces = data.load(cfg.data, cfg.size, "train", cfg.crop, cfg.cache_dir, log=env.log, attrs=cfg.attrs)
    if env.ddp and env.master:
        dist.barrier()
    saved = env.ckpt and env.ckpt.get("train_images")
    if saved and saved != len(faces["images"]):
        raise UsageError(f"--data {cfg.data} has {len(faces['images']):,} training images, the checkpoint's run had {saved:,}; "
                         "resume with the same data")
    val = None
    if env.master and cfg.eval_every > 0:
        try:
            v = data.load(cfg.data, cfg.size, "valid", cfg.crop, cfg.cache_dir, log=env.log, attrs=cfg.attrs)
            val = (data.to_float(v["images"][: cfg.eval_images], env.device),  # every attribute given:
                   v["cond"][: cfg.eval_images].to(env.device).float() * 2 - 1 if cfg.attrs else None)
        except data.DataError as e:
            env.log(f"no validation loss: {e}")
    return faces, val


def build(cfg, env, faces, val, given):
    """Model, EMA, optimizer and scaler (from the checkpoint when resuming), the memory plan, the batches, the plan."""
    ckpt, device = env.ckpt, env.device
    attrs = tuple(faces["cond_names"] or ())
    net = unet.config_from_dict(ckpt["model_args"]) if ckpt else dataclasses.replace(model_config(cfg), attrs=attrs)
    if tuple(net.attrs) != attrs:
        raise UsageError(f"the checkpoint's model is conditioned on {','.join(net.attrs) or 'nothing'}, but --data {cfg.data} "
                         f"gives {','.join(attrs) or 'no attributes'}; resume with the run's data")
    model, ema, opt, scaler, diffusion = make_model(cfg, env, net)
    resident = data.fits_on_gpu(faces["images"].nbytes, device)
    plan_memory(cfg, env, model, diffusion, cfg.batch_size, faces["images"].nbytes if resident else 0)
    fwd = torch.compile(model) if cfg.compile else model  # state dicts come from `model`: no _orig_mod. prefix
    fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None) if env.ddp else fwd
    batches = data.Batches(faces["images"], cfg.batch_size, device, cfg.seed, env.rank, env.world, flip=not cfg.no_flip,
                           attrs=faces["cond"], resident=resident)
    step = ckpt["step"] if ckpt else 0
    run = Run(net, model, ema, opt, scaler, diffusion, fwd, batches, make_plan(cfg, env, step, batches.steps_per_epoch, given),
              *(val or (None, None)), step=step, elapsed=ckpt.get("elapsed", 0.0) if ckpt else 0.0,
              loss_sum=torch.tensor(ckpt.get("loss_sum", 0.0) if ckpt else 0.0, device=device), loss_n=ckpt.get("loss_n", 0) if ckpt else 0,
              rare=(faces["cond"].float().mean(0) < 0.5).to(device, torch.uint8) if faces["cond"] is not None else None)
    plan = run.plan
    if math.isinf(plan.total):
        env.log(f"data: {len(batches.images):,} training images, {batches.steps_per_epoch:,} steps per epoch at batch {cfg.batch_size}; "
                f"the number of steps is chosen after timing the first ones, to end within --minutes {cfg.minutes:g}")
    else:
        env.log(f"data: {len(batches.images):,} training images, {batches.steps_per_epoch:,} steps per epoch at batch {cfg.batch_size}, "
                f"{plan.total:,} steps in all, lr warm-up over {plan.warmup:,} steps"
                + (f" (--warmup {cfg.warmup} is more than a tenth of the run)" if plan.warmup < cfg.warmup and not ckpt else ""))
    return run


def make_model(cfg, env, net):
    """-> (model, EMA, AdamW, GradScaler, GaussianDiffusion), with the checkpoint's state when resuming."""
    ckpt, device = env.ckpt, env.device
    model = unet.UNet(net).to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=fused_adamw(device))
    scaler = torch.amp.GradScaler(device.type, enabled=env.precision == "fp16")  # a no-op unless fp16
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        own = {k: opt.param_groups[0][k] for k in ("fused", "foreach", "capturable")}  # chosen for this device
        opt.load_state_dict(ckpt["optimizer"])  # brings the saved run's choices along with the moments
        for group in opt.param_groups:
            group.update(own)  # a CPU checkpoint resumed on a GPU gets the fused update back
        scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("world_size") == env.world:  # the dropout RNG continues exactly on the same world size
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        else:
            torch.manual_seed(cfg.seed + env.rank + ckpt["step"])
    env.log(f"model: {model.num_params() / 1e6:.2f}M parameters, {net}")
    return model, ema, opt, scaler, GaussianDiffusion(cfg.timesteps, cfg.schedule, cfg.objective, cfg.min_snr_gamma).to(device)


def make_plan(cfg, env, step, steps_per_epoch, given):
    """The schedule. A resume keeps the run's warm-up and EMA decay, and a --minutes run its planned end."""
    saved = env.ckpt and (env.ckpt.get("plan") or dict(  # checkpoints written before the plan had its own entry
        total=env.ckpt["args"]["max_steps"], warmup=env.ckpt["args"].get("warmup_steps", cfg.warmup), ema_decay=cfg.ema_decay))
    if cfg.dry_run:
        total = step + 2
    elif cfg.max_steps:
        total = cfg.max_steps
    elif saved and cfg.minutes and "epochs" not in given:
        total = saved["total"]
    elif cfg.minutes:
        total = math.inf  # until plan_minutes has measured the speed
    else:
        total = steps_per_epoch * cfg.epochs
    # --minutes' grids (sample_every None): four over the run, also when a resume moves its end
    grid_every = 0 if cfg.sample_every is None and math.isinf(total) else grids_every(cfg, total)
    if saved:  # the warm-up never takes more than a tenth of the run; kept from the start on resume
        return Plan(total, saved["warmup"], cfg.lr_decay, saved["ema_decay"], grid_every)
    return Plan(total, cfg.warmup if math.isinf(total) else min(cfg.warmup, total // 10), cfg.lr_decay, cfg.ema_decay, grid_every)


def model_config(cfg):
    return unet.preset(cfg.size, ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                       attn_res=cfg.attn_res, dropout=cfg.dropout, attr_film=cfg.attr_film)


def fused_adamw(device):
    """Whether AdamW runs fused (the whole update in a few kernels): on GPUs."""
    return device.type == "cuda"

# -----------------------------------------------------------------------------
# every so often: progress lines, validation, sample grids, checkpoints; signals


def train_loop(cfg, env, run):
    """The loop, with Ctrl-C and SIGTERM caught for the time it runs."""
    signals, handlers = [], {s: signal.getsignal(s) for s in EXIT_CODES}
    # one process on a CPU or MPS: a step can take minutes, so a signal also cuts the step itself short
    at_once = not env.ddp and env.device.type != "cuda" and not cfg.compile
    watch_signals(signals, [run.ema, run.model] if at_once else [run.ema])
    catch_signals(signals, env, at_once)
    try:
        return loop(cfg, env, run, signals)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def progress(cfg, env, run, loss_avg, steps_per_s, log):
    """A progress line (and a row of log.csv); a loss that is not finite ends the run on every rank."""
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if not math.isfinite(loss_avg):
        good = f"the last good checkpoint {ckpt_path} was kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
        raise SystemExit(f"error: the loss became {loss_avg} by step {run.step}: training diverged; {good}. "
                         "Lower --lr, raise --warmup, or use --precision bf16/fp32.")
    ips = steps_per_s * run.batches.batch_size
    epoch, total = run.step // run.batches.steps_per_epoch, run.plan.total
    lr = run.opt.param_groups[0]["lr"]
    eta = "timing the first steps" if math.isinf(total) else fmt_time((total - run.step) / max(steps_per_s, 1e-9))
    env.log(f"epoch {epoch} | step {run.step}/{'?' if math.isinf(total) else total} | loss {loss_avg:.4f} | {ips:,.1f} img/s | "
            f"lr {lr:.2e} | ETA {eta}")
    if log:
        append_log(log, [run.step, epoch, f"{loss_avg:.6f}", "", f"{lr:.3e}", f"{ips:.1f}", f"{run.elapsed:.1f}"])


def periodic(cfg, env, run, log, last, stop, t0):
    """Rank 0's work every so often: validation loss, the fixed-noise sample grid, the checkpoint."""
    save = (cfg.ckpt_every > 0 and run.step % cfg.ckpt_every == 0) or last or stop
    loss_sum = reduce_loss(env, run.loss_sum) if save else None  # on every rank: the checkpoint carries the running loss
    if not env.master:
        return
    step, epoch = run.step, run.step // run.batches.steps_per_epoch
    try:  # a signal cuts these short (stopping skips them): the checkpoint below matters more
        if run.val is not None and (step % cfg.eval_every == 0 or last) and not stop:
            vl = val_loss(cfg, env, run)
            bpd = val_bpd(cfg, env, run) if cfg.eval_bpd else None
            env.log(f"step {step} | val loss {vl:.4f}" + (f" | val bits/dim <= {bpd:.3f} (estimate)" if bpd else "") + f" ({len(run.val)} images)")
            append_log(log, [step, epoch, "", f"{vl:.6f}", "", "", f"{time.time() - t0:.1f}", f"{bpd:.4f}" if bpd else ""])
        every = run.plan.grid_every
        if ((every > 0 and step % every == 0) or (last and (every > 0 or cfg.dry_run))) and not stop:
            env.log(f"step {step} | samples {sample_grid(cfg, env, run)}")
    except Interrupted:
        run.model.train()
        env.log(f"step {step} | evaluation or sample grid cut short by the signal")
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    if save:
        run.elapsed = time.time() - t0
        saved = checkpoint(cfg, env, run, ckpt_path, loss_sum)
        env.log(f"step {step} | checkpoint {ckpt_path}" if saved else f"step {step} | weights not finite: checkpoint not written")
        if last and cfg.minutes and not env.ckpt:
            env.log(f"--minutes {cfg.minutes:g}: the run took {fmt_time(time.time() - env.t_start)} from start to this checkpoint")
        if stop:
            env.log(f"interrupted by {signal.Signals(stop).name} at step {step}"
                    + (f"; checkpoint written. Continue with: python train.py --resume --out {shlex.quote(cfg.out)}" if saved else ""))


def reduce_loss(env, loss_sum):
    """The mean over ranks of the summed loss, read on the host (here, every --log-every steps)."""
    if env.ddp:
        dist.all_reduce(loss_sum)
        loss_sum = loss_sum / env.world
    return loss_sum.item()


def open_log(cfg, env, run):
    """log.csv in --out, rewritten on resume to the rows up to the checkpoint's step (so each step appears once).
    -> its path on rank 0, else None."""
    if not env.master:
        return None
    path = os.path.join(cfg.out, "log.csv")
    header = ["step", "epoch", "loss", "val_loss", "lr", "img_per_s", "elapsed_s", "val_bpd"]
    rows = []
    if env.ckpt and os.path.exists(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0].isdigit() and int(r[0]) <= run.step]
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
    atomic_write(write, path, "--out")
    return path


def append_log(path, row):
    try:
        with open(path, "a", newline="") as f:
            csv.writer(f).writerow(row)
    except OSError as e:
        raise WriteError(f"cannot write {path} ({e.strerror}); free some space or pass another --out")


@torch.no_grad()
def sample_grid(cfg, env, run):
    """The EMA model's samples from the same noise at every call (x_T and, for a stochastic sampler, every z),
    drawn with the default sampler in batches of the training batch."""
    x_T = torch.randn(cfg.sample_n, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(cfg.seed)).to(env.device)
    g, b = torch.Generator(device=env.device).manual_seed(cfg.seed + 1), cfg.batch_size // env.world
    with env.ctx:
        x = torch.cat([run.diffusion.sample(run.ema, x.shape, DEFAULT_SAMPLER, cfg.sample_steps, DEFAULT_ETA, g, x_T=x) for x in x_T.split(b)])
    path = os.path.join(cfg.out, f"samples_{run.step:07d}.png")
    nrow = int(math.sqrt(cfg.sample_n) + 0.5)
    atomic_write(lambda tmp: torchvision.utils.save_image(data.to_uint8(x).float() / 255, tmp, format="png", nrow=nrow), path, "--out")
    return path


@torch.no_grad()
def val_loss(cfg, env, run):
    """L_simple on the validation images, with the same t and noise at every evaluation."""
    run.model.eval()
    g = torch.Generator(device=env.device).manual_seed(0)
    losses, b = [], run.batches.batch_size // env.world
    for i in range(0, len(run.val), b):
        x0 = run.val[i:i + b]
        t = torch.randint(0, cfg.timesteps, (len(x0),), generator=g, device=env.device)
        model = run.model if run.val_cond is None else functools.partial(run.model, attrs=run.val_cond[i:i + b])
        with env.ctx:
            losses.append(run.diffusion.training_losses(model, x0, t, torch.randn(x0.shape, generator=g, device=env.device)))
    run.model.train()
    return torch.cat(losses).mean().item()


@torch.no_grad()
def val_bpd(cfg, env, run):
    """A cheap unbiased estimate of the EMA model's bound on the validation images: --eval-bpd random t per image."""
    g = torch.Generator(device=env.device).manual_seed(0)
    b = run.batches.batch_size // env.world
    with env.ctx:
        parts = [run.diffusion.bits_per_dim(run.ema if run.val_cond is None else functools.partial(run.ema, attrs=run.val_cond[i:i + b]),
                                            run.val[i:i + b], g, t_samples=cfg.eval_bpd)["total"] for i in range(0, len(run.val), b)]
    return torch.cat(parts).mean().item()


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

# -----------------------------------------------------------------------------
# --minutes: fit the run into a time budget


def time_step(cfg, env, net, batch, steps=1):
    """-> (seconds, model): the fastest of `steps` training steps of a fresh `net` model at `batch` images (after
    one warm-up step), on synthetic data. Under fork_rng: timing draws none of the run's seeded randomness."""
    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        model = unet.UNet(net).to(env.device)
        x0, t = torch.zeros(batch, 3, net.image_size, net.image_size, device=env.device), torch.zeros(batch, dtype=torch.long, device=env.device)
        opt, diffusion = torch.optim.AdamW(model.parameters(), lr=0.0), GaussianDiffusion(cfg.timesteps).to(env.device)
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


def estimate_run(cfg, env, n_images):
    """A new run on a CPU or MPS, before decoding: how long it will take, from one timed step of its model at one
    image scaled to the batch; past a day, the command that gives faces on this machine in 30 minutes. Never refuses."""
    steps = cfg.max_steps or cfg.epochs * (n_images // cfg.batch_size)
    per_step = cfg.batch_size // env.world * time_step(cfg, env, model_config(cfg), 1)[0]
    line = (f"estimate: {steps:,} steps of {cfg.batch_size} images at ~{per_step:.1f} s each on this {env.device.type}: "
            f"about {fmt_time(steps * per_step)}")
    if steps * per_step > 86400:
        line += (f"; far beyond a day here. For faces on this machine in 30 minutes: "
                 f"python train.py --data {shlex.quote(cfg.data)} --size 32 --minutes 30")
    env.log(line)


def fit_model_to_minutes(cfg, env, given):
    """--minutes without --ch or --batch-size: the --size preset's width and batch, halved together (128 -> 64 -> 32)
    until the budget holds MIN_STEPS training steps, so that a short run on a small machine still ends with faces.
    The smallest candidate is timed first; a wider one is timed only if its FLOPs say that it could fit.
    A narrowed model gets dropout 0 (a run of a few epochs does not overfit) and, unless --lr is given, the learning
    rate scaled by how much narrower it is (Adam's best step grows as a layer's fan-in shrinks; REPORT sec. 3,
    "What a time budget buys"). -> the settings with that model."""
    base = model_config(cfg)
    candidates = [(base.ch >> k, cfg.batch_size >> k) for k in range(3) if base.ch >> k >= 32 and cfg.batch_size >> k >= 8 * env.world]
    budget = cfg.minutes * 60

    def net_of(ch):
        return dataclasses.replace(base, ch=ch, dropout=base.dropout if ch == base.ch else 0.0)

    def flops(model):
        with FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, 3, cfg.size, cfg.size, device=env.device), torch.zeros(1, dtype=torch.long, device=env.device)).sum().backward()
        return fc.get_total_flops()

    with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):  # timing draws no seeded randomness
        small_ch, small_b = candidates[-1]
        small_s, small_model = time_step(cfg, env, net_of(small_ch), small_b // env.world, 2)
        small_flops, choice = flops(small_model), len(candidates) - 1
        for i, (ch, b) in enumerate(candidates[:-1]):
            guess = small_s * flops(unet.UNet(net_of(ch)).to(env.device)) * b / (small_flops * small_b)
            if budget / guess >= MIN_STEPS and budget / time_step(cfg, env, net_of(ch), b // env.world, 2)[0] >= MIN_STEPS:
                choice = i
                break
    choice = int(from_rank0(env, choice))  # every rank builds rank 0's choice
    ch, b = candidates[choice]
    env.log(f"--minutes {cfg.minutes:g}: --ch {ch} --batch-size {b} --dropout {net_of(ch).dropout:g}, the widest of "
            f"{', '.join(f'{c}/{bb}' for c, bb in candidates)} (channels/batch) whose speed here leaves "
            f">= {MIN_STEPS:,} steps in the budget" + (" (none does: the smallest)" if choice == len(candidates) - 1
                                                         and budget / small_s < MIN_STEPS else ""))
    lr = cfg.lr if "lr" in given else cfg.lr * base.ch / ch
    if lr != cfg.lr:
        env.log(f"--minutes {cfg.minutes:g}: --lr {lr:g}, {cfg.lr:g} times {base.ch}/{ch}, the preset's width over the model's: "
                "a narrower net takes larger steps")
    return replace(cfg, ch=ch, batch_size=b, dropout=net_of(ch).dropout, lr=lr)


def plan_minutes(cfg, env, run):
    """--minutes: time the steps after the first two (compilation, autotuning); once at least 10 steps and 10 s
    are timed, choose how many steps fit what is left of the budget, then the warm-up, LR decay and EMA for them."""
    synchronize(env.device)
    now = time.time()
    if run.probe is None:
        run.probe = (run.step + 2, None)
    if run.step == run.probe[0]:
        run.probe = (run.step, now)
    if run.probe[1] is None:
        return
    steps, seconds = run.step - run.probe[0], now - run.probe[1]
    total = fit_minutes(cfg, env, run, steps / seconds if steps >= 10 and seconds >= min(10, 1.2 * cfg.minutes) else 0)
    if total is None:
        return
    # the warm-up takes a tenth of the run, the EMA averages about its last tenth, and a grid shows each quarter
    run.plan = Plan(total, min(cfg.warmup, total // 10), cfg.lr_decay, min(cfg.ema_decay, 1 - 10 / total),
                    grids_every(cfg, total))
    env.log(f"--minutes {cfg.minutes:g}: {steps / seconds * cfg.batch_size:,.1f} img/s measured: {total:,} steps in all "
            f"({total / run.batches.steps_per_epoch:.2f} epochs), lr warm-up {run.plan.warmup:,} steps then "
            f"{cfg.lr_decay} decay to step {total:,}, EMA decay {run.plan.ema_decay:.5f}")
    if total < FACE_STEPS and env.master:
        per_step, final = budget_terms(cfg, run.val, steps / seconds)
        need = time.time() - env.t_start + (FACE_STEPS - run.step) * per_step + final
        env.log(f"--minutes {cfg.minutes:g}: {total:,} steps are too few for faces, so the samples may be mostly noise; "
                f"faces come from about {FACE_STEPS:,} steps, which take about --minutes {math.ceil(need / 60)} on this machine")


def replan_minutes(cfg, env, run, rate):
    """--minutes, at every progress line: if the speed changed (a busy machine), move the end to keep the budget."""
    total = fit_minutes(cfg, env, run, rate)
    if total is not None and abs(total - run.plan.total) > 0.02 * run.plan.total:
        run.plan = dataclasses.replace(run.plan, total=total, ema_decay=min(cfg.ema_decay, 1 - 10 / total),
                                       grid_every=grids_every(cfg, total))
        env.log(f"--minutes {cfg.minutes:g}: now {rate * cfg.batch_size:,.1f} img/s; the run will end at step {total:,} "
                f"(EMA decay {run.plan.ema_decay:.5f})")


def grids_every(cfg, total):
    """--sample-every, or for a --minutes plan a quarter of the run rounded up: three grids on the way, then the last."""
    return cfg.sample_every if cfg.sample_every is not None else -(-total // 4)


def fit_minutes(cfg, env, run, rate):
    """The step at which the run ends on time at `rate` training steps/s, or None before there is a rate.
    Rank 0's clock and rate decide, and every rank gets its answer: all end at the same step."""
    end = 0
    if env.master and rate > 0:
        per_step, final = budget_terms(cfg, run.val, rate)
        end = run.step + max(1, int(0.98 * (cfg.minutes * 60 - (time.time() - env.t_start) - final) / per_step))
    end = int(from_rank0(env, end))
    return end if end > 0 else None


def budget_terms(cfg, val, rate):
    """-> (seconds per training step at `rate` steps/s with its share of the periodic grids and evaluations, seconds
    of the grids and evaluation that do not scale with the steps: the last ones, and the plan's four grids).
    A forward pass costs about a third of a training step."""
    grid = (cfg.sample_n * cfg.sample_steps if cfg.sample_every != 0 else 0) / (3 * cfg.batch_size * rate)
    evaluate = (len(val) * (2 + cfg.eval_bpd) if val is not None else 0) / (3 * cfg.batch_size * rate)
    per_step = 1 / rate + (grid / cfg.sample_every if cfg.sample_every else 0) + (evaluate / cfg.eval_every if val is not None else 0)
    return per_step, (4 if cfg.sample_every is None else 1) * grid + evaluate

# -----------------------------------------------------------------------------
# memory: plan a step against the device's memory


def plan_memory(cfg, env, model, diffusion, batch, resident_bytes=0):
    """Estimate a training step's memory from the activations autograd keeps per image (measured on 1 and
    2 images); with --grad-checkpoint auto turn activation checkpointing on only when the batch needs it,
    and refuse a batch that cannot fit with a one-line error that names one that can. resident_bytes: the
    training images that will live on the device."""
    b = batch // env.world
    if env.device.type == "mps":  # unified memory, no figure to plan against
        model.grad_checkpoint = cfg.grad_checkpoint == "on"
        return
    available = device_memory(env.device)
    # fp32 weights, grads, two Adam moments and the EMA; DDP adds its gradient buckets (one more copy of the grads)
    state = (20 + 4 * env.ddp) * model.num_params() + resident_bytes
    budget = 0.85 * available
    for on in ([False, True] if cfg.grad_checkpoint == "auto" else [cfg.grad_checkpoint == "on"]):
        model.grad_checkpoint = on
        with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):  # leaves the RNG as it was
            per_image = 1.25 * activation_bytes_per_image(model, diffusion, model.cfg.image_size, env.device, env.ctx)  # +25%: backward's temporaries
        need = state + b * per_image
        if need <= budget:
            env.log(f"memory: ~{fmt_bytes(need)} for a batch of {b} (of {fmt_bytes(available)} on {env.device.type}); "
                    f"activation checkpointing {'on' if on else 'off'}")
            return
    fit = int((budget - state) / per_image) * env.world
    hint = f"use --batch-size {fit} or less" if fit >= env.world else "use a smaller model (--ch)"
    hint += ", or --grad-checkpoint auto" if cfg.grad_checkpoint == "off" else ""
    raise UsageError(f"a batch of {batch} needs ~{fmt_bytes(need)}, more than the {fmt_bytes(available)} available "
                     f"on {env.device.type}: {hint}")


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

# -----------------------------------------------------------------------------
# --bench: the speed of a training step


# dense bf16 tensor-core peak (TFLOP/s) by device name; the first match wins. --peak-tflops overrides.
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250), ("A100", 312),
               ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125)]


def bench(cfg, env):
    """Time training steps on synthetic data; count FLOPs with torch.utils.flop_counter."""
    device = env.device
    model, _, opt, scaler, diffusion = make_model(cfg, env, model_config(cfg))
    plan_memory(cfg, env, model, diffusion, cfg.batch_size)
    fwd = torch.compile(model) if cfg.compile else model
    fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None) if env.ddp else fwd
    b = cfg.batch_size // env.world
    x0 = torch.rand(b, 3, cfg.size, cfg.size, device=device) * 2 - 1
    x0 = x0.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x0
    params = list(model.parameters())
    ema_params = [p.detach().clone() for p in params]

    def one_step(step):
        t = torch.randint(0, cfg.timesteps, (b,), device=device)
        train_step(fwd, diffusion, x0, t, torch.randn_like(x0), opt, scaler, env.ctx, params, ema_params, step, cfg.grad_clip, cfg.ema_decay)

    # model FLOPs: forward + backward of the eager model, per process (recomputation is not counted)
    gc, model.grad_checkpoint = model.grad_checkpoint, False
    with FlopCounterMode(display=False) as fc:
        with env.ctx:
            diffusion.training_losses(model, x0, torch.randint(0, cfg.timesteps, (b,), device=device), torch.randn_like(x0)).mean().backward()
    model.grad_checkpoint = gc
    opt.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    t_c = time.time()
    for i in range(3):  # warm-up: compilation, cudnn autotuning
        one_step(i)
    synchronize(device)
    env.log(f"bench: warm-up {time.time() - t_c:.1f}s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for i in range(cfg.bench_steps):
        one_step(3 + i)
    synchronize(device)
    dt = (time.time() - t0) / cfg.bench_steps
    # host time: issuing one step's kernels from an idle device. Near the step time, the GPU waits on Python
    # and the launches (too small a batch per GPU): --compile, or a larger batch, is what helps then.
    host = []
    for i in range(3):
        t1 = time.time()
        one_step(3 + cfg.bench_steps + i)
        host.append(time.time() - t1)
        synchronize(device)
    tflops = flops / dt / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = cfg.peak_tflops or next((p for k, p in PEAK_TFLOPS if k in name), None) if device.type == "cuda" else cfg.peak_tflops
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
    env.log(f"bench: {name} | size {cfg.size} | batch {b}/process x {env.world} | {env.precision} | compile {cfg.compile} | "
            f"channels_last {cfg.channels_last} | activation checkpointing {model.grad_checkpoint}")
    env.log(f"bench: {b * env.world / dt:,.1f} img/s | {dt * 1e3:.1f} ms/step (host {min(host) * 1e3:.1f} ms to issue one"
            f"{', launch-bound' if min(host) > 0.8 * dt and device.type != 'cpu' else ''}) | peak memory {mem} | {flops / b / 1e9:.2f} GFLOP/img (fwd+bwd) | "
            f"{tflops:.2f} TFLOP/s/process" + (f" | MFU {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s" if peak else " | MFU n/a (pass --peak-tflops)"))
    return 0

# -----------------------------------------------------------------------------
# evaluations of a checkpoint: --bpd and --x0-error


def evaluate_bpd(cfg, env):
    """--bpd N: the checkpoint's (EMA) variational bound, [DDPM] eq. 5, on N validation images: over every t, or
    estimated from --bpd-t K stratified t per image (K + 1 model calls instead of T)."""
    if env.ckpt is None:
        raise UsageError("--bpd evaluates a checkpoint: name it with --resume PATH (or --resume --out DIR)")
    model, diffusion = model_from_checkpoint(env.ckpt, cfg.resume)
    if cfg.bpd_t >= diffusion.T:
        raise UsageError(f"--bpd-t {cfg.bpd_t}: the model has only T-1 = {diffusion.T - 1} timesteps to draw from; "
                         f"use at most {diffusion.T - 1}, or 0 for every t")
    images = data.load(cfg.data, cfg.size, "valid", cfg.crop, cfg.cache_dir, log=env.log)["images"][: cfg.bpd]
    model, diffusion = model.to(env.device).eval(), diffusion.to(env.device)
    g, parts, b, t0 = torch.Generator(device=env.device).manual_seed(0), [], min(cfg.batch_size, 256), time.time()
    for i in range(0, len(images), b):
        with env.ctx:
            parts.append(diffusion.bits_per_dim(model, data.to_float(images[i:i + b], env.device), g, t_samples=cfg.bpd_t or None))
        env.log(f"bpd: {i + len(parts[-1]['total'])}/{len(images)} images, {fmt_time(time.time() - t0)}")
    r = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    se = r["total"].std().item() / math.sqrt(len(r["total"])) if len(r["total"]) > 1 else float("nan")
    how = f"an unbiased estimate from {cfg.bpd_t} stratified t per image" if cfg.bpd_t else "every t"
    env.log(f"bits/dim on {len(images)} validation images (step {env.ckpt['step']}, T={diffusion.T}, {how}): "
            f"prior L_T {r['prior'].mean():.4f} + sum of L_t {r['vb'].mean():.4f} + decoder L_0 {r['decoder'].mean():.4f} "
            f"= {r['total'].mean():.4f} +- {se:.4f}")
    return 0


@torch.no_grad()
def evaluate_x0_error(cfg, env):
    """--x0-error N: the mean squared error of the EMA model's x0_hat at a range of t on N validation images, beside
    that of the best linear denoiser (the Wiener filter of the training images' mean and covariance: it is exact
    for Gaussian data, and any good model beats it). Where the model is worse, samplers inherit its errors."""
    if env.ckpt is None:
        raise UsageError("--x0-error evaluates a checkpoint: name it with --resume PATH (or --resume --out DIR)")
    model, diffusion = model_from_checkpoint(env.ckpt, cfg.resume)
    model, diffusion, device = model.to(env.device).eval(), diffusion.to(env.device), env.device
    load = lambda split, n: data.to_float(data.load(cfg.data, cfg.size, split, cfg.crop, cfg.cache_dir, log=env.log)["images"][:n], device)
    train_x, x0 = load("train", 20_000).flatten(1).double(), load("valid", cfg.x0_error)  # (N, D), (n, 3, H, W)
    mean = train_x.mean(0)
    lam, U = torch.linalg.eigh(torch.cov((train_x - mean).T))  # the covariance's eigenvalues (D,) and vectors (D, D)
    lam, g, b = lam.clamp(min=0), torch.Generator(device=device).manual_seed(0), min(cfg.batch_size, 256)
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
# formatting, and the flags


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def fmt_bytes(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_value(v):
    return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def get_args(argv=None):
    """-> (args, the set of flags given on the command line)."""
    args = make_parser().parse_args(argv)
    quiet = make_parser()
    for action in quiet._actions:  # parse again with no defaults: what is left was typed by the user
        action.default = argparse.SUPPRESS
    return args, set(vars(quiet.parse_args(argv)))


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
    """argparse type for --p-drop-attr: 'uniform', 'balanced' or a probability."""
    if s in ("uniform", "balanced"):
        return s
    v = float(s)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be 'uniform', 'balanced' or in [0, 1], got {s}")
    return v


def add_attribute_flags(p):
    g = p.add_argument_group("attribute conditioning (sample with sample.py --attrs Smiling=1 --guidance W)")
    g.add_argument("--attrs", default=None, help="condition on CelebA attributes from the annotation file: 'all' or names, "
                   "e.g. Smiling,Male,Eyeglasses (default: an unconditional model)")
    g.add_argument("--attr-film", action="store_true", help="the attributes also scale and shift every residual block's "
                   "normalised features (FiLM), besides the bias they add with the time embedding")
    g.add_argument("--p-uncond", type=real, default=0.1, help="probability that an image's whole condition is dropped "
                   "(trains the unconditional model that classifier-free guidance needs)")
    g.add_argument("--p-drop-attr", type=drop_rate, default="uniform",
                   help="probability that each attribute is dropped on its own, so that any subset can be asked for: a number, or "
                        "'uniform': a rate drawn from U(0, 1) per image, which makes the number of specified attributes uniform on 0..K; "
                        "'balanced': as uniform, but an attribute in its rarer state (Eyeglasses=1, Young=0) is kept unless the "
                        "whole condition is dropped: rare states are followed more closely, but an attribute left out of a "
                        "request then leans to its common state (REPORT sec. 6)")


def make_parser():
    p = data.Parser(description="Train a DDPM (denoising diffusion) on CelebA faces.",
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
                   help="autocast precision; auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU/MPS; fp32 is plain fp32, without TF32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format")
    g.add_argument("--grad-checkpoint", default="auto", choices=["auto", "on", "off"],
                   help="recompute each U-Net block in backward (less memory, ~1/3 more compute); auto: on only when "
                        "the measured activation memory of a batch would not fit the device")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--out", default="out", help="folder for checkpoints, sample grids and log.csv")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds one, replacing it")
    g.add_argument("--log-every", type=positive(int), default=100, help="print a progress line every N steps")
    g.add_argument("--sample-every", type=non_negative, default=5000, help="sample grid from fixed noise with the EMA weights every N steps "
                   "(0: never; --minutes: four over the run, the last at its end, unless given)")
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


if __name__ == "__main__":
    main()
