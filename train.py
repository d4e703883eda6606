"""
Train a DDPM on CelebA faces: one GPU, many (torchrun), MPS or CPU. Or latent diffusion's two stages: the
autoencoder, then a DDPM on its latents.

    python train.py --data data --size 64 --epochs 100
    torchrun --nproc_per_node=8 train.py --data data --size 64 --epochs 100
    python train.py --data data --size 32 --minutes 30   # the run that fits in 30 minutes here
    python train.py --data data --size 64 --autoencoder --minutes 10 --out ae   # latent diffusion: the
    python train.py --data data --latents ae/ckpt.pt --minutes 20 --out ldm     # autoencoder, its DDPM
    python train.py --resume --out out                   # continue the run in out/, with its settings
    python train.py --bench                              # img/s, TFLOP/s and MFU on synthetic data

Read from the top: `loop` is [DDPM] Algorithm 1, a step is `train_step`, what is due now and then is
`after_step`. Then the setup, the data and the model, and the extras, each in its section: latents,
--minutes, a step's memory and time, signals, torchrun, --bench, and last the flags, where every setting
says its default, its help and whether a resume may change it. `cfg` holds the settings, `env` the
processes and device, `run` what the loop updates. Step s draws the whole global batch's randomness from a
generator seeded with (seed, s): a resume repeats the uninterrupted run, on any number of GPUs (dropout's
masks, each process's own, aside).
"""
import os
import signal
import sys
import time

STARTED = time.time()  # --minutes counts from here: the imports below take seconds


def quit_quietly(signum, frame):
    """Ctrl-C while torch loads: one line, not a traceback (main() then takes Ctrl-C over)."""
    print("interrupted before training started; nothing to save", file=sys.stderr)
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, quit_quietly)
# short OpenMP spinning: a core that another program uses costs its share, not every op (REPORT sec. 3.10)
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
import argparse
import contextlib
import copy
import csv
import dataclasses
import functools
import importlib.util
import math
import shlex
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

import autoencoder
import data
import unet
import util
from diffusion import DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, OBJECTIVES, SCHEDULES, GaussianDiffusion
from util import UsageError, fmt_bytes, fmt_time

ERRORS = (UsageError, util.WriteError, util.CheckpointError, data.DataError)  # bad input
MIN_STEPS = 1500  # --minutes narrows the preset until this many steps fit (REPORT sec. 3.5)
FACE_STEPS = 1000  # 1,037 steps made faces (REPORT sec. 3.5); a plan of fewer gets a warning
COMPILE_SECONDS = 90  # torch.compile's warm-up of the 64 px preset on an H200 (REPORT sec. 3.10)
THREADS_EVERY = 10  # seconds between two looks at the CPU's load (other programs come and go)
SMALLER = "use a smaller --size, --ch or --batch-size"

# -----------------------------------------------------------------------------
# the run: train -> loop -> train_step, then what is due


def main(argv=None, started=None):
    with util.one_line_errors(ERRORS, "interrupted before training started; nothing to save"):
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again
        args, given = make_parser().parse(argv)
        code = train(args, given, started or time.time())
    if code:
        sys.exit(code)


def train(args, given, started):
    """The phases of a run. -> exit code."""
    cfg, env = setup(args, given, started)  # and every check that needs no data
    try:
        if cfg.bench:
            return bench(cfg, env)
        if cfg.download and env.master:
            try:
                data.select(cfg.data)
            except data.DataError:
                data.download(cfg.data, env.say)
        if cfg.minutes and not env.ckpt and not cfg.dry_run and not given & {"ch", "batch_size"}:
            cfg = fit_model_to_minutes(cfg, env, given)
        ae = autoencoder_model(env) if env.ae else None  # a latent run's: it encodes images, decodes grids
        run = build(cfg, env, *load_data(cfg, env, ae), given, ae)
        if run.step >= run.plan.total:
            env.say(f"nothing to do: the checkpoint is at step {run.step}, where the run ends; raise "
                    "--max-steps or --epochs to train further")
            return 0
        # a CPU step can take minutes: a signal then cuts it short inside (after a compiled or DDP step)
        at_once = not env.ddp and env.device.type != "cuda" and not env.compile
        if at_once:
            stop_inside_steps([run.ema, run.model], env.signals)
        else:
            stop_inside_steps([run.ema], env.signals)  # the EMA's grids and evaluations
        with StopSignals(env.signals, env.say, at_once):
            return loop(cfg, env, run)
    finally:
        if env.ddp and dist.is_initialized():
            dist.destroy_process_group()
        util.release_folder(*env.claim)


def loop(cfg, env, run):
    """[DDPM] Algorithm 1 on a global batch of cfg.batch_size images (latents in a latent run), of which this
    rank takes a shard. An autoencoder run takes the same steps, its loss the reconstruction's."""
    B = cfg.batch_size
    device = env.device
    shard = slice(env.rank * B // env.world, (env.rank + 1) * B // env.world)
    gen = torch.Generator(device=device)  # re-seeded every step: all of a step's randomness
    run.model.train()
    while run.step < run.plan.total:  # line 6: until converged
        gen.manual_seed((cfg.seed * 1_000_003 + run.step) % 2**64)
        x0, attrs = run.batches.get(run.step, gen)  # line 2: x_0 ~ q(x_0), (B/world, C, H, W)
        x0 = x0.contiguous(memory_format=run.memory_format)
        if cfg.autoencoder:  # the first stage of latent diffusion: no t; noise draws z ~ q(z | x_0)
            noise = torch.randn((B, *run.latent_shape), generator=gen, device=device)[shard]
            losses = functools.partial(autoencoder.training_losses, x=x0, noise=noise,
                                       kl_weight=cfg.kl_weight)
        else:
            t = torch.randint(0, cfg.timesteps, (B,), generator=gen, device=device)[shard]  # 3: t ~ U(0..T-1)
            noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=device)[shard]  # 4: eps ~ N(0, I)
            noise = noise.contiguous(memory_format=run.memory_format)
            cond = condition(attrs, gen, cfg, shard, run.rare) if attrs is not None else None
            losses = functools.partial(run.diffusion.training_losses, x0=x0, t=t, noise=noise,
                                       model_kwargs=dict(attrs=cond) if cond is not None else None)
        rng = torch.get_rng_state()  # dropout's: a step that a signal cuts short is rolled back
        try:
            loss = train_step(run, losses, lr_at(run.step, cfg.lr, run.plan))  # line 5: a gradient step
        except Interrupted:  # weights, optimizer and RNG stay those of run.step
            run.opt.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            return after_step(cfg, env, run, None)
        run.step += 1
        code = after_step(cfg, env, run, loss)  # progress, --minutes, evaluations, checkpoints, signals
        if code is not None:
            return code
    return 0


def train_step(run, losses, lr):
    """One AdamW step on the mean of losses(model), the per-image loss: for a DDPM L_simple = ||eps -
    eps_theta(x_t, t)||^2 ([DDPM] eq. 14). Then the EMA. -> the loss, a tensor (reading it would wait for
    the device)."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    with run.ctx:  # autocast
        loss = losses(run.fwd).mean()
    run.scaler.scale(loss).backward()  # the scaler is a no-op unless fp16
    run.scaler.unscale_(run.opt)  # clipping sees the true gradient
    torch.nn.utils.clip_grad_norm_(run.params, run.grad_clip)
    run.scaler.step(run.opt)  # skipped when fp16 overflowed
    run.scaler.update()
    run.opt.zero_grad(set_to_none=True)
    update_ema(run.ema_params, run.params, run.step, run.plan.ema_decay)
    return loss.detach()


def lr_at(step, lr, plan):
    """A linear warm-up over plan.warmup steps, then constant or a cosine decay to 0 at plan.total."""
    if step < plan.warmup:
        return lr * (step + 1) / plan.warmup
    if plan.lr_decay == "cosine" and math.isfinite(plan.total):
        return lr * 0.5 * (1 + math.cos(math.pi * (step - plan.warmup) / max(1, plan.total - plan.warmup)))
    return lr


@torch.no_grad()
def update_ema(ema_params, params, step, decay):
    # ema = d ema + (1 - d) param in one kernel, as swa_utils' get_ema_multi_avg_fn (AveragedModel reads its
    # step count on the host: a GPU sync per step); d warms up
    torch._foreach_lerp_(ema_params, params, 1.0 - min(decay, (1 + step) / (10 + step)))


def condition(attrs, gen, cfg, shard, rare):
    """Condition dropout ([CFG] Algorithm 1, line 3): (B/world, K) 0/1 attributes -> +1 present, -1 absent,
    0 dropped. `balanced` keeps an attribute in its rarer state unless all are dropped: Eyeglasses (7% of
    faces) is shown as present whenever a face has them, so the rare state is never dropped on its own."""
    B, K, device = cfg.batch_size, attrs.shape[1], attrs.device
    uniform = cfg.p_drop_attr in ("uniform", "balanced")
    rate = torch.rand(B, 1, generator=gen, device=device) if uniform else cfg.p_drop_attr
    keep = (torch.rand(B, K, generator=gen, device=device) >= rate)[shard]  # each attribute on its own
    if cfg.p_drop_attr == "balanced":
        keep |= attrs == rare
    keep &= (torch.rand(B, 1, generator=gen, device=device) >= cfg.p_uncond)[shard]  # the whole condition
    return (attrs.float() * 2 - 1) * keep


def after_step(cfg, env, run, loss):
    """What is due after a step (loss None: one cut short): the --minutes plan and deadline, a progress line,
    the CPU's threads, the validation loss and grid, the checkpoint. -> the exit code, or None."""
    if loss is not None:
        run.loss_sum = run.loss_sum + loss
        run.loss_n += 1
        if math.isinf(run.plan.total):
            plan_minutes(cfg, env, run)  # --minutes: times the first steps, then sets the plan
    stop = stop_signal(env)
    if loss is not None and on_any_rank(past_deadline(cfg, env, run) and not stop, env.ctrl):
        # --minutes: the rest of the budget is the last grid's, evaluation's and checkpoint's
        ema_decay = min(cfg.ema_decay, 1 - 10 / run.step)
        run.plan = dataclasses.replace(run.plan, total=run.step, ema_decay=ema_decay)
    last = run.step >= run.plan.total
    if loss is not None and (run.step % cfg.log_every == 0 or last or stop or run.step in (1, 10)):
        progress(cfg, env, run)
    t0 = time.time()
    if not stop and env.master:
        evaluate(cfg, env, run, last)
    if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or last or stop:
        save(cfg, env, run, last, stop)
    run.t_log += time.time() - t0  # not training time
    if stop:
        return 128 + stop  # the shell's code for a death by that signal
    return None


def stop_signal(env):
    """The signal that stops the run, agreed by every rank, or None. A closed terminal also fails the writes
    to stdout: its SIGHUP is the one cause."""
    if not on_any_rank(env.signals, env.ctrl):
        return None
    if SIGHUP in env.signals:
        return SIGHUP
    if env.signals:
        return env.signals[0]
    return signal.SIGTERM  # another rank's signal


def save(cfg, env, run, last, stop):
    """The checkpoint, written by rank 0, and what goes with it."""
    loss_sum = mean_over_ranks(run.loss_sum)  # on every rank; a resume continues it
    if not env.master:
        return
    path = os.path.join(cfg.out, "ckpt.pt")
    run.elapsed = time.time() - run.t0
    t0 = time.time()
    saved = checkpoint(cfg, env, run, path, loss_sum)
    run.save_s = time.time() - t0  # --minutes keeps this much for the last one
    took = fmt_time(time.time() - env.t_start)
    env.say(f"step {run.step} | " + (f"checkpoint {path}" if saved else "weights not finite: not saved"))
    if last and cfg.minutes and not env.ckpt:
        env.say(f"--minutes {cfg.minutes:g}: the run took {took} from start to this checkpoint")
    if last and cfg.dry_run:
        env.say(f"dry run: the setup works ({took}; a checkpoint of {fmt_bytes(os.path.getsize(path))})")
    if stop:
        line = f"interrupted by {signal_name(stop)} at step {run.step}"
        if saved:
            line += ("; checkpoint written. Continue with: python train.py --resume --out "
                     f"{shlex.quote(cfg.out)}")
        env.say(line)
        if getattr(env.say, "lost", False):  # stdout is gone (| head); stderr may still be read
            with contextlib.suppress(OSError):
                print(line, file=sys.stderr, flush=True)


def checkpoint(cfg, env, run, path, loss_sum):
    """One self-describing file, written atomically; non-finite weights are not (-> False)."""
    sd = run.model.state_dict()
    if not all(torch.isfinite(v).all() for v in sd.values()):
        return False
    cuda_rng = None
    if env.device.type == "cuda":
        cuda_rng = torch.cuda.get_rng_state()
    ckpt = dict(
        format=util.CKPT_FORMAT, args=vars(cfg), plan=dataclasses.asdict(run.plan),
        model_args=config_dict(run.model.cfg), model=sd, ema=run.ema.state_dict(),
        optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict(), step=run.step,
        epoch=run.step // run.batches.steps_per_epoch, world_size=env.world, data_id=run.data_id,
        train_images=len(run.batches.images), elapsed=run.elapsed, loss_sum=loss_sum, loss_n=run.loss_n,
        rng=dict(torch=torch.get_rng_state(), cuda=cuda_rng))
    if env.ae is not None:  # a latent run carries its decoder, so that sample.py needs this file alone
        ckpt.update(autoencoder=env.ae["weights"], autoencoder_args=env.ae["args"])
    util.save_checkpoint(ckpt, path)
    return True

# -----------------------------------------------------------------------------
# the objects of a run


@dataclass
class Env:
    """The processes, the device, and the signals that arrived."""
    ddp: bool
    rank: int
    world: int
    local_world: int  # processes on this machine
    t_start: float  # when the process began (--minutes counts from here)
    out: str
    say: object = print  # rank 0's print (which survives a closed terminal)
    signals: list = field(default_factory=list)
    device: torch.device = None
    precision: str = None
    ctx: object = None  # autocast
    compile: bool = False
    channels_last: bool = False
    ctrl: object = None  # torchrun: the gloo group in which the ranks agree
    ckpt: dict = None  # the checkpoint a --resume continues
    ae: dict = None  # a latent run: its autoencoder (args: config, scale factor, identity; weights)
    claim: tuple = (None, ())  # rank 0's lock on --out, and the folders it made
    load: object = None  # the CPU's load by other programs (util.CpuLoad), for the threads
    threads_t: float = 0.0  # when the threads were last chosen

    @property
    def master(self):
        return self.rank == 0


@dataclass
class Plan:
    """The schedule (total: inf until --minutes has timed the steps); grids at grid_from + k * grid_every
    and at the end."""
    total: float
    warmup: int
    lr_decay: str
    ema_decay: float
    grid_every: int = 0
    grid_from: int = 0


@dataclass
class Run:
    """What the loop updates: the model, its EMA and optimizer, the data, the plan and the counters."""
    model: torch.nn.Module  # checkpoints take its state dict
    fwd: object  # the model as a step calls it (compiled, DDP)
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    diffusion: GaussianDiffusion  # None in an autoencoder run
    ctx: object
    memory_format: torch.memory_format
    grad_clip: float
    plan: Plan
    batches: data.Batches = None
    val: tuple = None  # rank 0: (validation images or latents, attributes or None)
    step: int = 0
    elapsed: float = 0.0  # seconds of training, across resumes
    loss_sum: torch.Tensor = None  # summed since the last multiple of --log-every
    loss_n: int = 0
    rare: torch.Tensor = None  # (K,) each attribute's rarer state
    data_id: str = None  # data.identity of the training images
    latent_shape: tuple = None  # an autoencoder run: (C, H/f, W/f)
    decoder: object = None  # a latent run: latents -> images in [-1, 1] (the autoencoder, in eval mode)
    t0: float = 0.0  # time.time() - elapsed at the start
    t_log: float = 0.0  # when the next progress line's steps began, less evaluation time
    step_log: int = 0
    probe: tuple = None  # --minutes: (step, time) where the timing began
    forward_s: float = None  # --minutes: seconds of an EMA forward pass per image
    rate: float = 0.0  # --minutes: steps per second, a running mean
    save_s: float = 0.0  # --minutes: seconds the last checkpoint took to write
    grids: int = 0  # grids drawn by this process
    last_grid: int = 0  # the step of the last one
    log: object = None  # rank 0: log.csv

    def __post_init__(self):
        self.params = list(self.model.parameters())
        self.ema_params = list(self.ema.parameters())

# -----------------------------------------------------------------------------
# what is due now and then: progress lines, validation, sample grids


def progress(cfg, env, run):
    """A progress line and a row of log.csv; a loss that is not finite ends the run. Every rank calls it: the
    loss is the mean over the ranks, and a --minutes re-plan is rank 0's."""
    now = time.time()
    rate = (run.step - run.step_log) / max(now - run.t_log, 1e-9)  # steps/s since the last line
    if run.probe and not math.isinf(run.plan.total) and run.step < 0.95 * run.plan.total:
        # --minutes: the machine got slower or faster; the speed of one line's steps varies by 10% here, a
        # running mean that gives the last line 0.7 by less
        run.rate = 0.3 * run.rate + 0.7 * rate
        replan(cfg, env, run, run.rate)
    loss = mean_over_ranks(run.loss_sum) / run.loss_n
    if not math.isfinite(loss):
        path = os.path.join(cfg.out, "ckpt.pt")
        kept = "nothing was saved"
        if os.path.exists(path):
            kept = f"the last good checkpoint {path} was kept"
        raise SystemExit(f"error: the loss became {loss} by step {run.step}: training diverged; {kept}. "
                         "Lower --lr, raise --warmup, or use --precision bf16/fp32.")
    epoch = run.step // run.batches.steps_per_epoch
    lr = run.opt.param_groups[0]["lr"]
    total = "?" if math.isinf(run.plan.total) else run.plan.total
    eta = "timing the first steps"
    if math.isfinite(run.plan.total):
        eta = fmt_time((run.plan.total - run.step) / max(rate, 1e-9))
    env.say(f"epoch {epoch} | step {run.step}/{total} | loss {loss:.4f} | {rate * cfg.batch_size:,.1f} img/s "
            f"| lr {lr:.2e} | ETA {eta}")
    log_row(run, loss=f"{loss:.6f}", lr=f"{lr:.3e}", img_per_s=f"{rate * cfg.batch_size:.1f}")
    if run.step % cfg.log_every == 0:  # the loss column averages the steps since the last multiple
        run.loss_sum = torch.zeros((), device=env.device)
        run.loss_n = 0
    run.t_log = now
    run.step_log = run.step
    if env.load is not None and now - env.threads_t >= THREADS_EVERY:  # other programs came or went
        util.set_threads(env.device, env.local_world, env.say, env.load)
        env.threads_t = now


def evaluate(cfg, env, run, last):
    """Rank 0: the validation loss and the fixed-noise sample grid when due (a signal cuts them short)."""
    try:
        if run.val is not None and (run.step % cfg.eval_every == 0 or last):
            vl, psnr = val_loss(cfg, env, run)
            line = f"step {run.step} | val loss {vl:.4f} ({len(run.val[0])} images, EMA weights)"
            if psnr is not None:
                line += f", reconstruction PSNR {psnr:.2f} dB"
            env.say(line)
            log_row(run, val_loss=f"{vl:.6f}")
        if grid_due(cfg, run, last):
            run.grids += 1
            run.last_grid = run.step
            env.say(f"step {run.step} | samples {sample_grid(cfg, env, run)}")
    except Interrupted:
        env.say(f"step {run.step} | evaluation or sample grid cut short by the signal")


def grid_due(cfg, run, last):
    """A grid at grid_from + k * grid_every, and at the end (a dry run's too)."""
    every = run.plan.grid_every
    if last:
        return every > 0 or cfg.dry_run
    return every > 0 and run.step >= run.plan.grid_from and (run.step - run.plan.grid_from) % every == 0


def log_row(run, **values):
    """A row of log.csv (rank 0)."""
    if run.log:
        run.log(step=run.step, epoch=run.step // run.batches.steps_per_epoch,
                elapsed_s=f"{time.time() - run.t0:.1f}", **values)


@torch.no_grad()
def sample_grid(cfg, env, run):
    """The EMA model's samples from the same noise at every call (x_T and every later z); an autoencoder's
    reconstructions of the first validation (or training) images, each row of originals above its
    reconstructions."""
    if cfg.autoencoder:
        return reconstruction_grid(cfg, env, run)
    shape = (cfg.sample_n, *run.batches.shape)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed))
    g = torch.Generator(device=env.device).manual_seed(cfg.seed + 1)
    images = []
    t0 = time.time()
    todo = len(x_T) * len(run.diffusion.timesteps(DEFAULT_SAMPLER, cfg.sample_steps))
    shown = util.Progress(todo, "sample grid", "image-steps", env.say, last=False)
    done = 0
    for x in x_T.to(env.device).split(cfg.batch_size // env.world):
        def count(*_):
            nonlocal done
            done += len(x)
            shown(done)
        with run.ctx:
            # latents have no [-1, 1] to clip x0_hat to
            z = run.diffusion.sample(run.ema, x.shape, DEFAULT_SAMPLER, cfg.sample_steps, DEFAULT_ETA, g,
                                     x_T=x, clip=run.decoder is None, callback=count)
            images.append(z if run.decoder is None else run.decoder(z))
    run.forward_s = (time.time() - t0) / todo  # --minutes prices grids and validation with it
    path = os.path.join(cfg.out, f"samples_{run.step:07d}.png")
    util.save_image(data.to_uint8(torch.cat(images)), path, "--out", nrow=round(math.sqrt(cfg.sample_n)))
    return path


def reconstruction_grid(cfg, env, run):
    """Rows of originals, each above the row of its reconstructions (the decoded posterior means)."""
    x = run.val[0] if run.val is not None else run.batches.get(0, torch.Generator(env.device))[0]
    x = x[:cfg.sample_n]
    t0 = time.time()
    with run.ctx:
        r = autoencoder.reconstruct(run.ema, x)
    run.forward_s = (time.time() - t0) / len(x)
    k = max(1, round(math.sqrt(len(x))))  # images per row
    rows = [part for i in range(0, len(x), k) for part in (x[i:i + k], r[i:i + k])]
    path = os.path.join(cfg.out, f"samples_{run.step:07d}.png")
    util.save_image(data.to_uint8(torch.cat(rows)), path, "--out", nrow=k)
    return path


@torch.no_grad()
def val_loss(cfg, env, run):
    """The loss of the EMA weights on the validation images, with the same t and noise every time. -> (the
    loss, an autoencoder's reconstruction PSNR or None)."""
    images, attrs = run.val
    g = torch.Generator(device=env.device).manual_seed(0)
    b = cfg.batch_size // env.world
    losses, psnrs = [], []
    for i in range(0, len(images), b):
        x0 = images[i:i + b]
        if cfg.autoencoder:
            noise = torch.randn((len(x0), *run.latent_shape), generator=g, device=env.device)
            with run.ctx:
                losses.append(autoencoder.training_losses(run.ema, x0, noise, cfg.kl_weight))
                psnrs.append(autoencoder.psnr(autoencoder.reconstruct(run.ema, x0), x0))
            continue
        t = torch.randint(0, cfg.timesteps, (len(x0),), generator=g, device=env.device)
        kwargs = None
        if attrs is not None:
            kwargs = dict(attrs=attrs[i:i + b])
        with run.ctx:
            noise = torch.randn(x0.shape, generator=g, device=env.device)
            losses.append(run.diffusion.training_losses(run.ema, x0, t, noise, model_kwargs=kwargs))
    psnr = torch.cat(psnrs).mean().item() if psnrs else None
    return torch.cat(losses).mean().item(), psnr

# -----------------------------------------------------------------------------
# setup: settings, processes, device, --out, the checks that need no data


def setup(args, given, started):
    """-> (cfg, env): the flags (or the checkpoint's), and what is resolved before the run."""
    ddp = "RANK" in os.environ
    rank = int(os.environ["RANK"]) if ddp else 0
    world = int(os.environ["WORLD_SIZE"]) if ddp else 1
    env = Env(ddp, rank, world, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), started, args.out)
    if env.master:  # rank 0 prints; once stdout is gone, into --out/stdout.log, and the run stops
        env.say = util.Say(functools.partial(stdout_log, env), functools.partial(stdout_lost, env))
    else:
        env.say = lambda *a, **k: None
    cfg = resumed(args, given, env) if args.resume else argparse.Namespace(**vars(args))
    if cfg.latents and not env.ckpt:
        cfg = open_autoencoder(cfg, given, env)
    if env.ckpt and "autoencoder" in env.ckpt:  # a latent run carries its autoencoder
        env.ae = dict(args=env.ckpt["autoencoder_args"], weights=env.ckpt["autoencoder"])
    check_args(cfg, given, env)
    minutes = cfg.minutes and not cfg.resume
    cfg = replace(cfg, data=os.path.abspath(cfg.data), out=os.path.abspath(cfg.out))
    if minutes and "lr_decay" not in given:
        cfg = replace(cfg, lr_decay="cosine")  # ends at 0
    if minutes and "sample_every" not in given:
        cfg = replace(cfg, sample_every=None)  # four grids over the run, once it is planned
    cfg = replace(cfg, sample_steps=min(cfg.sample_steps, cfg.timesteps))
    if cfg.dry_run:  # quick at any size
        cfg = replace(cfg, batch_size=world, sample_steps=min(cfg.sample_steps, 2), sample_n=1, eval_images=2)
    device = util.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)), env.local_world)
    cuda = device.type == "cuda"
    env.out = cfg.out
    env.device = device
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        env.ctrl = dist.new_group(backend="gloo") if cuda else None  # agreeing never waits for the GPU
    env.precision, env.ctx = util.autocast(device, cfg.precision)
    compiles = cuda and importlib.util.find_spec("triton") is not None and not cfg.dry_run
    env.compile = cfg.compile if cfg.compile is not None else compiles
    # eager on a GPU, NCHW measured faster (GroupNorm converts channels_last back: REPORT sec. 3.10);
    # compiled, or on the CPU, channels_last
    env.channels_last = cfg.channels_last if cfg.channels_last is not None else not cuda or env.compile
    net = saved_config(env.ckpt) if env.ckpt else model_config(cfg, env.ae)
    check_fits(net, device, "use a smaller --ch or --size")
    torch.backends.cudnn.benchmark = True
    if cfg.seed is None:  # rank 0's: every rank shuffles alike
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
        cfg = replace(cfg, seed=int(from_rank0(seed, env.ctrl)))
    torch.manual_seed(cfg.seed + rank)  # dropout; the rest comes from a generator per step
    threads = util.set_threads(device, env.local_world, env.say)
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        env.load = util.CpuLoad()  # looked at again now and then
        env.threads_t = time.time()
    threads = f" ({threads} threads)" if device.type == "cpu" else ""
    env.say(f"device {device} x {world} process{'es' if world > 1 else ''}{threads}, {env.precision}, "
            f"compile {env.compile}, channels_last {env.channels_last}, seed {cfg.seed}")
    if not cfg.bench:
        check_out(cfg, env)
    return cfg, env


def stdout_log(env):
    """Where rank 0's lines go once stdout is gone: --out/stdout.log (None before the folder exists)."""
    return os.path.join(env.out, "stdout.log") if os.path.isdir(env.out) else None


def stdout_lost(env):
    """stdout failed: the run stops as on a signal (unless one already stops it: a closed terminal's
    SIGHUP)."""
    if not env.signals:
        env.signals.append(SIGPIPE)


def replace(cfg, **changes):
    """A copy of the settings with `changes` (never changed in place)."""
    return argparse.Namespace(**{**vars(cfg), **changes})


def resumed(args, given, env):
    """--resume: every setting from the checkpoint (env.ckpt); a flag that contradicts it is refused."""
    if args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: drop one of them")
    path = os.path.join(args.out, "ckpt.pt") if args.resume == "latest" else args.resume
    env.ckpt = ckpt = util.load_checkpoint(path, build=autoencoder.check_weights)
    if not all(k in ckpt for k in ("args", "optimizer", "scaler")):
        raise util.CheckpointError(f"{path} lacks the optimizer state that a resume needs; sample from it "
                                   "with sample.py, or start a new run")
    planned = (ckpt.get("plan") or {}).get("total", math.inf)
    if ckpt["step"] > planned:
        raise util.CheckpointError(f"{path}: its step {ckpt['step']:,} is beyond the {planned:,} steps its "
                                   "run planned; the file was edited or damaged: use another copy")
    cfg = vars(args).copy()
    if "out" not in given and args.resume != "latest":  # in the checkpoint's folder
        cfg["out"] = path if os.path.isdir(path) else os.path.dirname(path) or "."
    for k, v in ckpt["args"].items():
        if isinstance(v, list):
            v = tuple(v)
        if k not in cfg or SETTINGS[k].resume == ONCE or k == "out":
            continue
        if k in given and SETTINGS[k].resume == FIXED and cfg[k] != v:
            flag = "--" + k.replace("_", "-")
            what = f"{flag} {shown(cfg[k])} contradicts the checkpoint's {shown(v)} ({path})"
            if isinstance(v, bool):  # a switch: given, it was off in the run
                what = f"{flag} contradicts the checkpoint {path}, whose run was trained without it"
            raise UsageError(f"{what}; drop {flag} to continue the run, or start a new run in another --out")
        if k not in given:
            cfg[k] = v
    if "epochs" in given and "max_steps" not in given:  # extended by epochs: not the saved --max-steps
        cfg["max_steps"] = None
    env.say(f"resuming from {path} at step {ckpt['step']}")
    return argparse.Namespace(**cfg)


def shown(value):
    """A setting as it is typed: 1,2,2 for a tuple."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


def open_autoencoder(cfg, given, env):
    """--latents PATH: the autoencoder whose latents the run learns (env.ae); the run takes its image size and
    crop. -> the settings with them."""
    path = cfg.latents
    ckpt = util.load_checkpoint(path, parts=("ema",), build=autoencoder.check_weights)
    a = ckpt["args"]
    if not a.get("autoencoder"):
        raise UsageError(f"--latents {path} is a diffusion model's checkpoint, not an autoencoder's; pass "
                         "the ckpt.pt of a train.py --autoencoder run")
    for key in ("size", "crop"):
        if key in given and getattr(cfg, key) != a[key]:
            raise UsageError(f"--{key} {getattr(cfg, key)}: the autoencoder {path} was trained with --{key} "
                             f"{a[key]}, and a latent run takes its autoencoder's; drop --{key}, or train an "
                             f"autoencoder with --{key} {getattr(cfg, key)}")
    identity = f"{util.tensor_crc(ckpt['ema']):08x}"  # the CRC-32 of its weights
    env.ae = dict(args=dict(model_args=ckpt["model_args"], path=os.path.abspath(path), id=identity,
                            scale_factor=None), weights=ckpt["ema"])
    return replace(cfg, size=a["size"], crop=a["crop"])


def check_args(cfg, given, env):
    """Everything that can be checked without data: a mistake costs seconds, not a decode."""
    runs = run_kinds(cfg)
    for flag in sorted(given):
        if not SETTINGS[flag].runs & runs:
            wanted = " or ".join(RUN_NAMES[r] for r in sorted(SETTINGS[flag].runs))
            dashed = "--" + flag.replace("_", "-")
            raise UsageError(f"{dashed} is for {wanted}, not for this run; drop {dashed}")
    loose = next((f for f in ("p_uncond", "p_drop_attr", "attr_film") if f in given), "").replace("_", "-")
    for bad, message in [
        ("minutes" in given and given & {"max_steps", "epochs"},
         "--minutes chooses the number of steps itself; drop --max-steps/--epochs, or drop --minutes"),
        (cfg.minutes and cfg.dry_run, "--dry-run runs 2 steps to check a setup; drop it or --minutes"),
        (cfg.dry_run and cfg.resume, "--dry-run writes a new checkpoint: drop it or --resume"),
        (cfg.other_data and not cfg.resume, "--other-data is for a resume on other images; add --resume"),
        (cfg.lr > 1, f"--lr {cfg.lr:g}: above 1 the run diverges; U-Nets train at about 1e-4 to 5e-4"),
        (cfg.attrs is not None and not cfg.attrs.strip(","), "--attrs '': name the attributes, e.g. --attrs "
         "Smiling,Male, or 'all'; or drop --attrs for an unconditional model"),
        (loose == "attr-film" and not cfg.attrs, "--attr-film lets a conditional model's attributes scale "
         "and shift each block (FiLM); add --attrs NAMES, or drop it"),
        (loose and loose != "attr-film" and not cfg.attrs, f"--{loose} sets how a conditional model drops "
         "its attributes; add --attrs NAMES, or drop it"),
        (cfg.sample_steps > cfg.timesteps and "sample_steps" in given,
         f"--sample-steps {cfg.sample_steps} is more than --timesteps {cfg.timesteps}; lower it"),
        (cfg.batch_size % env.world, f"--batch-size {cfg.batch_size} must be divisible by the number of "
         f"processes ({env.world})"),
    ]:
        if bad:
            raise UsageError(message)
    if cfg.lr > 1e-2 and not cfg.resume:
        env.say(f"note: --lr {cfg.lr:g} is far above what diffusion U-Nets train with: expect it to diverge")
    check_model(cfg, given, env)


def run_kinds(cfg):
    """What this run is, as the flags' `runs` name it."""
    kinds = {AUTOENCODER if cfg.autoencoder else DIFFUSION}
    if cfg.latents:
        kinds.add(LATENT)
    if cfg.bench:
        kinds.add(BENCH)
    return kinds


def check_model(cfg, given, env):
    """The model the flags describe can be built; a size between presets says which it takes."""
    net = model_config(cfg, env.ae)
    try:
        if cfg.autoencoder:
            autoencoder.check_config(net)
        else:
            unet.check_config(net)
    except ValueError as e:
        field_, message = e.args
        if field_ == "image_size":
            flag = "--size"
        else:
            flag = "--" + field_.replace("_", "-")
        origin = ""
        if field_ != "image_size" and field_ not in given and not cfg.autoencoder:
            origin = f" (the --size {preset_of(net.image_size)} preset's)"
            if cfg.latents:
                origin = f" (the {preset_of(net.image_size)} latent preset's)"
        if cfg.latents and field_ == "image_size":
            message += f" (the {cfg.size}x{cfg.size} images' latents)"
        raise UsageError(f"{flag}{origin} {message}")
    if not cfg.autoencoder and net.image_size not in unet.PRESETS and not env.ckpt:
        what = f"--size {cfg.size}"
        if cfg.latents:
            what = f"the {net.image_size}x{net.image_size} latent"
        env.say(f"model: {what} takes the --size {preset_of(net.image_size)} preset (--ch, --ch-mult, "
                "--num-res-blocks, --attn-res, --dropout override it)")


def preset_of(size):
    """The U-Net preset a size takes: its own, or the nearest below (the smallest for a smaller one)."""
    return max([s for s in unet.PRESETS if s <= size] or [min(unet.PRESETS)])


def check_out(cfg, env):
    """--out: writable, without another run unless resumed (--overwrite removes it), locked."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out}: is a file; give a folder for checkpoints and samples")
    if not env.master:
        return
    stale = util.check_writable(cfg.out, "--out")
    old = []
    if os.path.isdir(cfg.out):
        old = [f for f in sorted(os.listdir(cfg.out)) if f in ("ckpt.pt", "log.csv", "stdout.log")
               or (f.startswith("samples_") and f.endswith(".png"))]
    listed = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
    if old and not cfg.resume and not cfg.overwrite:
        whose = "a run" if "ckpt.pt" in old else "an earlier run"
        raise UsageError(f"--out {cfg.out} already holds {whose}'s files ({listed}); continue it with python "
                         f"train.py --resume --out {shlex.quote(cfg.out)}, pick another --out, or pass "
                         "--overwrite to replace it")
    env.claim = util.claim_folder(cfg.out, "--out")  # last: nothing after it can fail
    if old and cfg.overwrite:
        for f in old:
            os.remove(os.path.join(cfg.out, f))
        env.say(f"--overwrite: removed the earlier run's {listed} from {cfg.out}")
    if stale:
        env.say(f"removed the temporary files that a killed run left in {cfg.out}")

# -----------------------------------------------------------------------------
# data, model, optimizer, plan


def load_data(cfg, env, ae=None):
    """-> (the training split: its images, or in a latent run the posteriors of its latents; (validation
    images or latents, attributes) or None; the data's identity). ae: a latent run's autoencoder."""
    sel = data.select(cfg.data, "train", log=env.say)
    n = len(sel["files"])
    data_id = data.identity(sel)
    if n < cfg.batch_size:
        raise UsageError(f"--data {cfg.data}: the train split has {plural(n, 'image')}, fewer than "
                         f"--batch-size {cfg.batch_size}; lower --batch-size")
    saved = env.ckpt.get("data_id") if env.ckpt else None
    if saved and saved != data_id and not cfg.other_data:
        theirs = env.ckpt["args"]["data"]
        was = plural(env.ckpt["train_images"], "image")
        if os.path.abspath(theirs) == cfg.data:
            raise UsageError(f"--data {cfg.data} changed since the checkpoint's run trained on it ({was} "
                             f"then, {plural(n, 'image')} now); restore those images, or pass --other-data "
                             "to continue on these")
        raise UsageError(f"--data {cfg.data} ({plural(n, 'image')}) is not the data the checkpoint's run "
                         f"trained on ({theirs}, {was}); resume with --data {shlex.quote(theirs)}, or pass "
                         f"--other-data to continue on {cfg.data}")
    if env.master and not (env.ckpt or cfg.minutes or cfg.dry_run) and env.device.type != "cuda":
        estimate_run(cfg, env, n)
    if env.ddp and not env.master:
        dist.barrier()  # rank 0 writes the caches first, the others load them
    faces = data.load(cfg.data, cfg.size, "train", cfg.crop, cfg.cache_dir, log=env.say, attrs=cfg.attrs,
                      sel=sel)
    if ae is not None:
        faces = dict(faces, images=encode_split(cfg, env, faces, ae))
    if env.ddp and env.master:
        dist.barrier()
    val = None
    if env.master and cfg.eval_every > 0:
        try:
            val = validation_set(cfg, env, ae)
        except data.DataError as e:
            env.say(f"no validation loss: {e}")
    return faces, val, data_id


def validation_set(cfg, env, ae):
    """(the first --eval-images validation images in [-1, 1], or their latents; their attributes or None)."""
    v = data.load(cfg.data, cfg.size, "valid", cfg.crop, cfg.cache_dir, log=env.say, attrs=cfg.attrs)
    n = cfg.eval_images
    x = data.to_float(v["images"][:n], env.device)
    if ae is not None:  # the latents the model learns: posterior means, scaled
        with torch.no_grad():
            x = torch.cat([ae.encode(part)[0] for part in x.split(256)]) * env.ae["args"]["scale_factor"]
    cond = None
    if cfg.attrs:  # every attribute given
        cond = v["cond"][:n].to(env.device).float() * 2 - 1
    return x, cond


def plural(n, word):
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def build(cfg, env, faces, val, data_id, given, ae=None):
    """The Run: make_run, the memory plan, the batches, the plan and the log."""
    attrs = tuple(faces["cond_names"] or ())
    net = saved_config(env.ckpt) if env.ckpt else model_config(cfg, env.ae, attrs)
    if tuple(getattr(net, "attrs", ())) != attrs:
        raise UsageError(f"the checkpoint's model is conditioned on {','.join(net.attrs) or 'nothing'}, "
                         f"--data {cfg.data} on {','.join(attrs) or 'nothing'}; resume with the run's data")
    run = make_run(cfg, env, net)
    resident = data.fits_on_gpu(faces["images"].nbytes, env.device)
    resident_bytes = faces["images"].nbytes if resident else 0
    run.model.grad_checkpoint = plan_memory(cfg, env, run, resident_bytes)  # activation checkpointing?
    if ae is not None:
        scale = env.ae["args"]["scale_factor"]
        run.batches = data.LatentBatches(faces["images"], cfg.batch_size, env.device, cfg.seed, env.rank,
                                         env.world, flip=not cfg.no_flip, attrs=faces["cond"],
                                         resident=resident, scale=scale, sample=cfg.posterior == "sample")
        run.decoder = functools.partial(autoencoder.decode_scaled, ae, scale=scale)
    else:
        run.batches = data.Batches(faces["images"], cfg.batch_size, env.device, cfg.seed, env.rank, env.world,
                                   flip=not cfg.no_flip, attrs=faces["cond"], resident=resident)
    run.plan = make_plan(cfg, env, run.step, run.batches.steps_per_epoch, given)
    run.val = val
    run.data_id = data_id
    if faces["cond"] is not None:
        run.rare = (faces["cond"].float().mean(0) < 0.5).to(env.device, torch.uint8)
    steps = "planned once timed" if math.isinf(run.plan.total) else f"{run.plan.total:,}"
    short = run.plan.warmup < cfg.warmup and not (env.ckpt or cfg.dry_run) and math.isfinite(run.plan.total)
    env.say(f"data: {len(faces['images']):,} training images, {run.batches.steps_per_epoch:,} steps per "
            f"epoch at batch {cfg.batch_size}; steps: {steps}, lr warm-up {run.plan.warmup:,}"
            + (f" (--warmup {cfg.warmup} is more than a tenth of the run)" if short else ""))
    if env.master:  # each step once: a resume keeps the rows up to its step
        resumed_at = run.step if env.ckpt else None
        run.log = CsvLog(os.path.join(cfg.out, "log.csv"), ["step", "epoch", "loss", "val_loss", "lr",
                         "img_per_s", "elapsed_s"], resumed_at, "--out")
    run.t0 = time.time() - run.elapsed
    run.t_log = run.t0
    run.step_log = run.step
    return run


def make_run(cfg, env, net):
    """Model, EMA, AdamW, GradScaler, diffusion (the checkpoint's on resume). -> Run, without data."""
    ckpt = env.ckpt
    device = env.device
    model = build_model(net).to(device)
    if env.channels_last:
        to_channels_last(model)
        if env.ddp:
            match_gradient_strides(model, device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=fused_adamw(device))
    scaler = torch.amp.GradScaler(device.type, enabled=env.precision == "fp16")
    fwd = torch.compile(model) if env.compile else model  # state dicts from `model`: no _orig_mod.
    if env.ddp:
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    diffusion = None
    if not cfg.autoencoder:
        diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule, cfg.objective, cfg.min_snr_gamma)
        diffusion = diffusion.to(device)
    fmt = torch.channels_last if env.channels_last else torch.contiguous_format
    plan = Plan(math.inf, cfg.warmup, cfg.lr_decay, cfg.ema_decay)
    run = Run(model, fwd, ema, opt, scaler, diffusion, env.ctx, fmt, cfg.grad_clip, plan,
              loss_sum=torch.zeros((), device=device))
    if cfg.autoencoder:
        run.latent_shape = (net.z_channels, net.latent_size, net.latent_size)
    if ckpt:
        restore(ckpt, model, ema, opt, scaler)
        if ckpt.get("world_size") == env.world:  # dropout continues exactly
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        else:
            torch.manual_seed(cfg.seed + env.rank + ckpt["step"])
        run.step = ckpt["step"]
        run.elapsed = ckpt.get("elapsed", 0.0)
        run.loss_n = ckpt.get("loss_n", 0)
        run.loss_sum += ckpt.get("loss_sum", 0.0)
    env.say(f"model: {model.num_params() / 1e6:.2f}M parameters, {net}")
    return run


def restore(ckpt, model, ema, opt, scaler):
    """A checkpoint's weights, EMA, optimizer and loss scaler into a run's. The optimizer keeps this device's
    implementation (fused, foreach): a CPU checkpoint resumed on a GPU gets the fused update back."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    own = {k: opt.param_groups[0][k] for k in ("fused", "foreach", "capturable")}
    opt.load_state_dict(ckpt["optimizer"])
    for group in opt.param_groups:
        group.update(own)
    scaler.load_state_dict(ckpt["scaler"])


def fused_adamw(device):
    """Whether AdamW runs fused (the whole update in a few kernels): on GPUs."""
    return device.type == "cuda"


def make_plan(cfg, env, step, steps_per_epoch, given):
    """The schedule; a resume keeps the warm-up and EMA decay (and a --minutes run its end)."""
    saved = env.ckpt.get("plan") if env.ckpt else None
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
    # --minutes' grids (sample_every None): four over the run
    grid_every = 0
    if cfg.sample_every is not None or math.isfinite(total):
        grid_every = grids_every(cfg, total)
    if saved:
        return Plan(total, saved["warmup"], cfg.lr_decay, saved["ema_decay"], grid_every)
    warmup = cfg.warmup
    if math.isfinite(total):
        warmup = min(cfg.warmup, total // 10)  # at most a tenth
    return Plan(total, warmup, cfg.lr_decay, cfg.ema_decay, grid_every)


def model_config(cfg, ae=None, attrs=()):
    """The network the flags describe: the --size preset's U-Net (in a latent run, the preset of the latent's
    size, with its channels), or the autoencoder."""
    if cfg.autoencoder:
        return autoencoder.AutoencoderConfig(
            image_size=cfg.size, factor=cfg.factor, z_channels=cfg.z_channels,
            ch=cfg.ch or autoencoder.AutoencoderConfig.ch,
            num_res_blocks=cfg.num_res_blocks or autoencoder.AutoencoderConfig.num_res_blocks,
            mid_attn=not cfg.no_mid_attn)
    size, channels = cfg.size, 3
    if ae is not None:
        first = autoencoder.config_from_dict(ae["args"]["model_args"])
        size, channels = first.latent_size, first.z_channels
    return unet.preset(size, in_channels=channels, ch=cfg.ch, ch_mult=cfg.ch_mult,
                       num_res_blocks=cfg.num_res_blocks, attn_res=cfg.attn_res, dropout=cfg.dropout,
                       attr_film=cfg.attr_film, attrs=attrs)


def saved_config(ckpt):
    """The config of the network a checkpoint holds."""
    if ckpt["args"].get("autoencoder"):
        return autoencoder.config_from_dict(ckpt["model_args"])
    return unet.config_from_dict(ckpt["model_args"])


def config_dict(net):
    if isinstance(net, autoencoder.AutoencoderConfig):
        return autoencoder.config_dict(net)
    return unet.config_dict(net)


def build_model(net):
    if isinstance(net, autoencoder.AutoencoderConfig):
        return autoencoder.Autoencoder(net)
    return unet.UNet(net)


# -----------------------------------------------------------------------------
# latents: a latent run's training set is the autoencoder's encoding of the images, cached once


def autoencoder_model(env):
    """A latent run's autoencoder (its EMA weights), in eval mode on the device."""
    net = autoencoder.config_from_dict(env.ae["args"]["model_args"])
    model = autoencoder.Autoencoder(net)
    model.load_state_dict(env.ae["weights"])
    model = model.to(env.device).eval().requires_grad_(False)
    if env.channels_last:  # encoding measured 1.4x faster so on the CPU
        to_channels_last(model)
    return model


def encode_split(cfg, env, faces, ae):
    """The posterior of every training image's latent (and of its mirror image's, unless --no-flip), from the
    latent cache when it holds this autoencoder's; the scale factor from them on a new run. -> (N, F, 2C, h,
    w) float32, the mean and log-variance of q(z | x) stacked."""
    fmt = torch.channels_last if env.channels_last else torch.contiguous_format

    def encode(x):
        return torch.cat(ae.encode(x.contiguous(memory_format=fmt)), dim=1)
    posteriors = data.load_latents(faces, encode, env.ae["args"]["id"], not cfg.no_flip, env.device, env.say)
    if env.ae["args"]["scale_factor"] is None:  # a new run; a resume keeps its own
        mean, logvar = posteriors[:, 0].chunk(2, dim=1)
        z = mean
        if cfg.posterior == "sample":
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
            z = mean + torch.exp(0.5 * logvar) * noise
        scale = autoencoder.scale_factor(z)
        env.ae["args"]["scale_factor"] = scale
        env.say(f"latents: scale factor {scale:.4f} (1 / the standard deviation of the {cfg.posterior}s of "
                "q(z | x))")
    return posteriors


# -----------------------------------------------------------------------------
# --minutes: fit the run into a time budget


def estimate_run(cfg, env, n_images):
    """A new CPU or MPS run, before decoding: how long it takes (past a day: the 30-minute command)."""
    steps = cfg.max_steps or cfg.epochs * (n_images // cfg.batch_size)
    one = time_step(model_config(cfg, env.ae), 1, env.device, env.ctx, SMALLER)  # seconds for one image
    per_step = cfg.batch_size // env.world * one
    line = (f"estimate: {steps:,} steps of {cfg.batch_size} images at ~{per_step:.1f} s each on this "
            f"{env.device.type}: about {fmt_time(steps * per_step)}")
    if steps * per_step > 86400:
        line += ("; far beyond a day here. For faces on this machine in 30 minutes: python train.py --data "
                 f"{shlex.quote(cfg.data)} --size 32 --minutes 30")
    env.say(line)


def fit_model_to_minutes(cfg, env, given):
    """--minutes without --ch or --batch-size: the preset's width and batch, halved together until MIN_STEPS
    fit the budget, but only to a model faster per image (a small GPU step is bound by its launches). A
    narrowed model gets dropout 0 and the lr times the width ratio, unless --lr is given (REPORT sec. 3.5).
    An autoencoder may narrow to 16 channels, a U-Net to 32."""
    base = model_config(cfg, env.ae)
    narrowest = 16 if cfg.autoencoder else 32
    candidates = [(base.ch >> k, cfg.batch_size >> k) for k in range(4)
                  if base.ch >> k >= narrowest and cfg.batch_size >> k >= 8 * env.world]
    budget = cfg.minutes * 60 - (COMPILE_SECONDS if env.compile else 0)

    def net_of(ch):
        if cfg.autoencoder:
            return dataclasses.replace(base, ch=ch)
        return dataclasses.replace(base, ch=ch, dropout=base.dropout if ch == base.ch else 0.0)

    per_step = {}  # candidate -> seconds per step, from the smallest
    for i in reversed(range(len(candidates))):
        if i + 1 in per_step and env.device.type != "cuda" and 8 * per_step[i + 1] * MIN_STEPS > budget:
            break  # on a CPU: a wider one, 8 times the work, cannot fit
        ch, b = candidates[i]
        per_step[i] = time_step(net_of(ch), b // env.world, env.device, env.ctx, SMALLER)
    per_image = {i: s / candidates[i][1] for i, s in per_step.items()}
    faster = [i for i in sorted(per_step) if all(per_image[i] < per_image[j] for j in per_image if j < i)]
    fits = [i for i in faster if budget / per_step[i] >= MIN_STEPS]
    chosen = fits[0] if fits else min(faster, key=per_image.get)
    ch, b = candidates[int(from_rank0(chosen, env.ctrl))]
    dropout = ""
    if not cfg.autoencoder:
        dropout = f" --dropout {net_of(ch).dropout:g}"
    why = f"the widest that leaves >= {MIN_STEPS:,} steps" if fits else "the fastest per image"
    env.say(f"--minutes {cfg.minutes:g}: --ch {ch} --batch-size {b}{dropout} of "
            f"{', '.join(f'{c}/{bb}' for c, bb in candidates)} (channels/batch): {why}")
    lr = cfg.lr
    if "lr" not in given:
        lr = cfg.lr * base.ch / ch  # the preset's width over the model's
    if lr != cfg.lr:
        env.say(f"--minutes {cfg.minutes:g}: --lr {lr:g}, {cfg.lr:g} times {base.ch}/{ch}")
    changes = dict(ch=ch, batch_size=b, lr=lr)
    if not cfg.autoencoder:
        changes.update(dropout=net_of(ch).dropout)
    return replace(cfg, **changes)


def plan_minutes(cfg, env, run):
    """--minutes, until there is a plan: time the steps after the first two (compilation, autotuning), and
    plan after 10 steps and 10 s (2% of a short budget)."""
    util.synchronize(env.device)
    if run.probe is None:
        run.probe = (run.step + 2, None)
    if run.step == run.probe[0]:
        run.probe = (run.step, time.time())
    if run.probe[1] is None:
        return
    seconds = time.time() - run.probe[1]
    if run.step - run.probe[0] >= 10 and seconds >= min(10, 1.2 * cfg.minutes):
        if env.master:
            b = min(cfg.sample_n, cfg.batch_size // env.world)  # the grids' batch
            run.forward_s = time_forward(run, b, env)
        run.rate = (run.step - run.probe[0]) / seconds
        replan(cfg, env, run, run.rate)


def replan(cfg, env, run, rate):
    """--minutes: the steps that fit the budget at `rate` steps/s, a warm-up of a tenth, the EMA over the last
    tenth, a grid each quarter (or now and three more; fewer where grids are dear); moved when the speed
    changes by 5%, the grids still to draw spread evenly over what is left."""
    per_step = seconds_per_step(cfg, run, rate)
    left = cfg.minutes * 60 - (time.time() - env.t_start) - grid_seconds(cfg, run) * grids_left(cfg, run)
    left -= last_seconds(cfg, run)
    total = int(from_rank0(run.step + max(1, int(0.98 * left / per_step)), env.ctrl))  # rank 0's plan
    first = math.isinf(run.plan.total)
    if not first and abs(total - run.plan.total) <= 0.05 * run.plan.total:
        return
    if first:
        warmup = min(cfg.warmup, total // 10)
        start = 0
        grids = grids_planned(cfg, run)
        if grids > 1 and -(-total // grids) <= run.step:  # the first part is over: a grid now, the rest later
            start = run.step
            grids -= 1
    else:
        warmup = run.plan.warmup
        start = max(run.last_grid, run.plan.grid_from)  # from the last grid drawn
        grids = max(1, grids_planned(cfg, run) - run.grids)  # still to draw, the last at the end
        if grids > 1 and start + grids_every(cfg, total - start, grids) <= run.step:
            start = run.step  # the next one is overdue in the new plan: drawn now, the others over the rest
            grids -= 1
    every = grids_every(cfg, total - start, grids)
    run.plan = Plan(total, warmup, cfg.lr_decay, min(cfg.ema_decay, 1 - 10 / total), every, start)
    now = "" if first else " now"
    env.say(f"--minutes {cfg.minutes:g}: {rate * cfg.batch_size:,.1f} img/s{now}: {total:,} steps in all "
            f"({total / run.batches.steps_per_epoch:.2f} epochs), lr warm-up {warmup:,} steps then "
            f"{cfg.lr_decay} decay, EMA decay {run.plan.ema_decay:.5f}")
    if first and total < FACE_STEPS and env.master and not cfg.autoencoder:
        need = time.time() - env.t_start + (FACE_STEPS - run.step) * per_step + last_seconds(cfg, run)
        env.say(f"--minutes {cfg.minutes:g}: {total:,} steps are too few for faces ({FACE_STEPS:,} take "
                f"about --minutes {math.ceil(need / 60)} on this machine); the samples may be mostly noise")


def grids_every(cfg, steps, grids=4):
    """--sample-every, or for a --minutes plan `steps` in `grids` parts, rounded up."""
    if cfg.sample_every is not None:
        return cfg.sample_every
    return -(-steps // grids)


def grids_planned(cfg, run):
    """--minutes' grids over the whole run: four (three on the way and the last), fewer where the three would
    take more than a tenth of the budget (a one-minute run on a laptop draws only the last)."""
    seconds = grid_seconds(cfg, run)
    if seconds <= 0:
        return 4
    return 1 + min(3, int(0.1 * cfg.minutes * 60 / seconds))


def grids_left(cfg, run):
    """The planned grids not drawn yet, but the last: priced apart from the steps (the last one in
    last_seconds)."""
    if cfg.sample_every is not None:
        return 0
    return max(0, grids_planned(cfg, run) - 1 - run.grids)


def forward_seconds(cfg, run, rate):
    """Seconds of an EMA forward pass per image: timed, or a third of a training step's share."""
    return run.forward_s or 1 / (3 * cfg.batch_size * rate)


def grid_seconds(cfg, run):
    """One sample grid: --sample-n images of --sample-steps model evaluations (an autoencoder's: one)."""
    if cfg.sample_every == 0:
        return 0.0
    evals = 1 if cfg.autoencoder else cfg.sample_steps
    return cfg.sample_n * evals * (run.forward_s or 0.0)


def val_seconds(cfg, run, fwd):
    """The validation loss: an EMA forward pass per image (an autoencoder's two: its loss, its
    reconstruction), at `fwd` seconds each."""
    if run.val is None:
        return 0.0
    passes = 2 if cfg.autoencoder else 1
    return passes * len(run.val[0]) * fwd


def seconds_per_step(cfg, run, rate):
    """A training step, with its share of the grids and validations that --sample-every and --eval-every
    set."""
    fwd = forward_seconds(cfg, run, rate)
    per_step = 1 / rate
    if cfg.sample_every:
        per_step += cfg.sample_n * cfg.sample_steps * fwd / cfg.sample_every
    if cfg.eval_every:
        per_step += val_seconds(cfg, run, fwd) / cfg.eval_every
    return per_step


def last_seconds(cfg, run):
    """What the end of a run takes: the last grid, the validation loss and the checkpoint (timed, or priced at
    200 MB/s for its weights, EMA and Adam's moments), with a margin of 20% and 3 s (the process's exit
    took about 1 s)."""
    val = val_seconds(cfg, run, run.forward_s or 0.0)
    save = run.save_s or 16 * run.model.num_params() / 200e6 + 0.5
    return 1.2 * (grid_seconds(cfg, run) + val + save) + 3.0


def past_deadline(cfg, env, run):
    """--minutes on a new run: whether only the end is left of the budget (a slower machine than planned
    ends the run early rather than late)."""
    if not cfg.minutes or env.ckpt or math.isinf(run.plan.total):
        return False
    return time.time() - env.t_start + last_seconds(cfg, run) >= cfg.minutes * 60

# -----------------------------------------------------------------------------
# a training step's memory, time and FLOPs


def plan_memory(cfg, env, run, resident_bytes=0):
    """Plan a training step's memory from the bytes autograd keeps for backward per image (the slope between
    the loss on 1 and 2 images); --grad-checkpoint auto turns activation checkpointing on only when the batch
    needs it. A batch that cannot fit is refused, naming one that can. -> whether to checkpoint."""
    mode = cfg.grad_checkpoint
    device = env.device
    if device.type == "mps":  # unified memory, no figure to plan against
        return mode == "on"
    b = cfg.batch_size // env.world
    # besides the activations: weights, gradients, Adam's moments, EMA (and DDP's buckets), resident images
    state_bytes = (20 + 4 * env.ddp) * run.model.num_params() + resident_bytes
    available = util.device_memory(device)
    budget = 0.85 * available
    for on in ([False, True] if mode == "auto" else [mode == "on"]):
        # +25%: backward's temporaries
        per_image = 1.25 * saved_bytes_per_image(run.model, on, device, env.ctx)
        need = state_bytes + b * per_image
        if need <= budget:
            env.say(f"memory: ~{fmt_bytes(need)} for a batch of {b} (of {fmt_bytes(available)} on "
                    f"{device.type}); activation checkpointing {'on' if on else 'off'}")
            return on
    fit = int((budget - state_bytes) / per_image) * env.world
    hint = f"use --batch-size {fit} or less" if fit >= env.world else "use a smaller model (--ch)"
    if mode == "off":
        hint += ", or --grad-checkpoint auto"
    raise UsageError(f"a batch of {cfg.batch_size} needs ~{fmt_bytes(need)}, more than the "
                     f"{fmt_bytes(budget)} a run may use (85% of the {fmt_bytes(available)} available on "
                     f"{device.type}): {hint}")


def saved_bytes_per_image(model, checkpointing, device, ctx):
    """Bytes that autograd keeps for backward per image, with activation checkpointing on or off: the slope
    between the loss on 1 and 2 inputs (the model's own setting is left as it was)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shape = input_shape(model.cfg)

    def measure(b):
        seen = set(params)
        total = 0
        def pack(t):
            nonlocal total
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
            return t
        x = torch.randn((b, *shape), device=device)
        what = f"{b} image{'s' * (b > 1)} of {shape}"
        with memory_errors(what, "use a smaller --size or --ch"), \
                ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probe_losses(model, x)
        return total

    was = model.grad_checkpoint
    model.grad_checkpoint = checkpointing
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return measure(2) - measure(1)
    finally:
        model.grad_checkpoint = was


def input_shape(net):
    """(C, H, W) of what a network takes: images, or an autoencoder's latents."""
    if isinstance(net, autoencoder.AutoencoderConfig):
        return (3, net.image_size, net.image_size)
    return (net.in_channels, net.image_size, net.image_size)


def probe_losses(model, x):
    """The per-image training loss of `model` on inputs x at t = 0 with zero noise: what the memory plan, the
    timings and the FLOP count run."""
    if isinstance(model.cfg, autoencoder.AutoencoderConfig):
        net = model.cfg
        noise = torch.zeros(len(x), net.z_channels, net.latent_size, net.latent_size, device=x.device)
        return autoencoder.training_losses(model, x, noise)
    t = torch.zeros(len(x), dtype=torch.long, device=x.device)
    return GaussianDiffusion(2).to(x.device).training_losses(model, x, t, torch.zeros_like(x))


@contextlib.contextmanager
def memory_errors(what, fix):
    """Running out of memory during `what` becomes a one-line UsageError that says `fix`."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        raise UsageError(f"{what} does not fit the memory ({str(e).splitlines()[0][:80]}); {fix}")


def check_fits(net, device, fix):
    """Refuse, before anything is allocated, a model whose state and one image's activations (a lower bound:
    the input and the first level's maps) exceed the memory of `device`."""
    with torch.device("meta"):  # shapes only: no memory, no time
        params = build_model(net).num_params()
    need = 20 * params + 4 * net.image_size ** 2 * (3 + net.ch * (2 * net.num_res_blocks + 2))
    available = util.device_memory(device) if device.type != "mps" else math.inf
    if need > available:
        raise UsageError(f"the model ({params / 1e6:,.1f}M parameters at {net.image_size}x{net.image_size}) "
                         f"needs at least {fmt_bytes(need)}, more than the {fmt_bytes(available)} available "
                         f"on {device.type}: {fix}")


def time_step(net, batch, device, ctx, fix):
    """-> seconds of a training step of a fresh model `net` at `batch` synthetic inputs (the faster of two,
    after a warm-up), drawing none of the run's seeded randomness; out of memory: `fix`."""
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build_model(net).to(device)
        x = torch.zeros(batch, *input_shape(net), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        for _ in range(3):
            t0 = time.time()
            with memory_errors(f"a step of {batch} image{'s' * (batch > 1)} at {net.image_size}x"
                               f"{net.image_size}", fix), ctx:
                probe_losses(model, x).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            util.synchronize(device)
            times.append(time.time() - t0)
    return max(min(times[1:]), 1e-9)


@torch.no_grad()
def time_forward(run, batch, env):
    """Seconds per image of an EMA forward pass at `batch` inputs like the training set's (the second of two):
    a grid's model evaluation, or an autoencoder's reconstruction."""
    x = torch.zeros(batch, *run.batches.shape, device=env.device)
    t = torch.zeros(batch, dtype=torch.long, device=env.device)
    for _ in range(2):
        t0 = time.time()
        with run.ctx:
            if run.diffusion is None:
                autoencoder.reconstruct(run.ema, x)
            else:
                run.ema(x, t)
        util.synchronize(env.device)
    return (time.time() - t0) / batch


def count_flops(model, loss, ctx):
    """FLOPs of loss().backward() (torch.utils.flop_counter), without activation checkpointing's recompute."""
    checkpointing = model.grad_checkpoint
    model.grad_checkpoint = False
    with FlopCounterMode(display=False) as fc, ctx:
        loss().backward()
    model.grad_checkpoint = checkpointing
    return fc.get_total_flops()


def match_gradient_strides(model, device):
    """Each weight in the strides its gradient comes back in, measured by one backward of a tiny input: DDP
    then copies no gradient into its buckets, and does not warn. A 1x1 kernel that a conv applies returns a
    channels_last gradient; one that attention applies as a matrix, an NCHW one."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = torch.zeros(1, *input_shape(model.cfg), device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        probe_losses(model, x).sum().backward()
    for p in model.parameters():
        if p.grad is not None and p.grad.stride() != p.stride():
            p.data = torch.empty_strided(p.shape, p.grad.stride(), device=p.device).copy_(p.data)
    model.zero_grad(set_to_none=True)


def to_channels_last(model):
    """Every 4-d weight in channels_last strides. Module.to(memory_format=) may keep a 1x1 kernel's NCHW
    strides (the same bytes), while its gradient comes back channels_last: DDP warns, and copies."""
    for p in model.parameters():
        if p.dim() == 4:
            o, i, h, w = p.shape
            p.data = torch.empty_strided(p.shape, (i * h * w, 1, w * i, i), device=p.device).copy_(p.data)

# -----------------------------------------------------------------------------
# signals: stop at a safe point, or cut a long phase short


SIGHUP = getattr(signal, "SIGHUP", 1)  # (not on Windows)
SIGPIPE = getattr(signal, "SIGPIPE", 13)


def signal_name(sig):
    """SIGINT, SIGTERM; SIGHUP and SIGPIPE with what sent them."""
    said = {SIGHUP: "SIGHUP (the terminal closed)", SIGPIPE: "SIGPIPE (stdout closed)"}
    return said.get(sig) or signal.Signals(sig).name


class Interrupted(Exception):
    """A signal arrived in a long phase (a CPU step, a sample grid, an evaluation): it is cut short."""


class StopSignals:
    """For the time it is entered: Ctrl-C, SIGTERM (Slurm, Kubernetes, `timeout`) and SIGHUP (a closed
    terminal) are appended to `signals`, for the loop to stop at a safe point (after this step, or with
    `at_once` inside it); the first is acknowledged at once. A second Ctrl-C then quits at once; a second
    SIGTERM is ignored (Slurm signals every process and torchrun forwards it again: neither may cut the last
    checkpoint short)."""

    def __init__(self, signals, say, at_once=False):
        self.signals = signals
        self.say = say
        self.when = "now" if at_once else "after this step"
        kinds = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]  # Windows
        self.saved = {s: signal.getsignal(s) for s in kinds}

    def handler(self, signum, frame):
        if not self.signals:
            line = f"\n{signal.Signals(signum).name}: stopping {self.when} and writing a checkpoint"
            if signum != SIGHUP:  # a closed terminal has no keys to press
                line += "; press Ctrl-C again to quit at once without one"
            self.say(line)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.signals.append(signum)

    def __enter__(self):
        for s in self.saved:
            signal.signal(s, self.handler)

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)


def stop_inside_steps(models, signals):
    """Once a signal has arrived, each of `models` raises Interrupted: every block before its forward, every
    weight after its gradient. A CPU step, grid or evaluation of minutes ends within one block."""
    def check(*_):
        if signals:
            raise Interrupted
    for model in models:
        for block in model.blocks():
            block.register_forward_pre_hook(check)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(check)

# -----------------------------------------------------------------------------
# torchrun: the ranks agree


def mean_over_ranks(t):
    """The mean of tensor `t` over the ranks of a torchrun job, read on the host (`t` is left as it is)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.item()


def from_rank0(value, group=None):
    """Rank 0's `value` (a number) on every rank of a torchrun job."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.broadcast(t, 0, group=group)
    return t.item()


def on_any_rank(flag, group=None):
    """True on every rank when `flag` is true on at least one."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([float(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item() > 0

# -----------------------------------------------------------------------------
# log.csv


class CsvLog:
    """A CSV file of `columns`, a row per call. From a run at step `resumed`, the rows of steps up to it are
    kept (the first column is the step); the rest go, so that each step appears once."""

    def __init__(self, path, columns, resumed, what):
        self.path = path
        self.columns = columns
        self.what = what
        rows = []
        if resumed is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r[:len(columns)] for r in csv.reader(f)
                        if r and r[0].isdigit() and int(r[0]) <= resumed]

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([columns] + rows)
        util.atomic_write(write, path, what)

    def __call__(self, **values):
        try:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([values.get(k, "") for k in self.columns])
        except OSError as e:
            raise util.WriteError(f"cannot write {self.path} ({util.why(e)}); free some space or pass "
                                  f"another {self.what}")

# -----------------------------------------------------------------------------
# --bench: the speed of a training step


# dense bf16 tensor-core peak (TFLOP/s) by device name, for MFU; the first match wins
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250),
               ("A100", 312), ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165),
               ("RTX 3090", 71), ("V100", 125)]


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_tflops(device):
    if device.type != "cuda":
        return None
    return next((p for k, p in PEAK_TFLOPS if k in device_name(device)), None)


def bench(cfg, env):
    """Time training steps on synthetic data; count their FLOPs with torch.utils.flop_counter."""
    device = env.device
    b = cfg.batch_size // env.world
    net = model_config(cfg, env.ae)
    run = make_run(cfg, env, net)
    run.model.grad_checkpoint = plan_memory(cfg, env, run)
    x0 = torch.rand(b, *input_shape(net), device=device) * 2 - 1

    def steps(n):
        for _ in range(n):
            if cfg.autoencoder:
                noise = torch.randn(b, *run.latent_shape, device=device)
                losses = functools.partial(autoencoder.training_losses, x=x0, noise=noise,
                                           kl_weight=cfg.kl_weight)
            else:
                t = torch.randint(0, cfg.timesteps, (b,), device=device)
                noise = torch.randn_like(x0)
                losses = functools.partial(run.diffusion.training_losses, x0=x0, t=t, noise=noise)
            train_step(run, losses, cfg.lr)
            run.step += 1

    flops = count_flops(run.model, lambda: probe_losses(run.model, x0).mean(), env.ctx)
    run.opt.zero_grad(set_to_none=True)
    t0 = time.time()
    steps(3)  # warm-up: compilation, cudnn autotuning
    util.synchronize(device)
    warmup = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    steps(cfg.bench_steps)
    util.synchronize(device)
    dt = (time.time() - t0) / cfg.bench_steps
    host = []
    for _ in range(3):  # the host's time to issue a step to an idle device: near dt, launches bound it
        t0 = time.time()
        steps(1)
        host.append(time.time() - t0)
        util.synchronize(device)
    peak = cfg.peak_tflops or peak_tflops(device)
    tflops = flops / dt / 1e12
    mem = "n/a"
    if device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    bound = ", launch-bound" if min(host) > 0.8 * dt and device.type != "cpu" else ""
    what = "autoencoder" if cfg.autoencoder else "U-Net"
    if cfg.latents:
        what = "latent U-Net"
    env.say(f"bench: {device_name(device)} | {what} {' x '.join(map(str, input_shape(net)))} | batch "
            f"{b}/process x {env.world} | {env.precision} | compile {env.compile} | channels_last "
            f"{env.channels_last} | activation checkpointing {run.model.grad_checkpoint} | warm-up "
            f"{warmup:.1f}s")
    mfu = "MFU n/a (pass --peak-tflops)"
    if peak:
        mfu = f"MFU {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s"
    env.say(f"bench: {b * env.world / dt:,.1f} img/s | {dt * 1e3:.1f} ms/step (host {min(host) * 1e3:.1f} ms "
            f"to issue one{bound}) | peak memory {mem} | {flops / b / 1e9:.2f} GFLOP/img (fwd+bwd) | "
            f"{tflops:.2f} TFLOP/s/process | {mfu}")
    return 0

# -----------------------------------------------------------------------------
# the flags: every setting of a run in one place


# which runs a flag is for: every training run is a diffusion or an autoencoder run; a latent run (a
# diffusion run on an autoencoder's latents) and --bench take flags of their own too
DIFFUSION, AUTOENCODER, LATENT, BENCH = "diffusion", "autoencoder", "latent", "bench"
RUN_NAMES = {DIFFUSION: "a diffusion run", AUTOENCODER: "an autoencoder run (--autoencoder)",
             LATENT: "a latent run (--latents AE_CKPT)", BENCH: "--bench"}
ANY = {DIFFUSION, AUTOENCODER}
# what a --resume does with a setting: it may change it, the checkpoint's is kept (a contradicting flag is
# refused), or it is no setting of the run (never taken from the checkpoint)
MAY, FIXED, ONCE = "may change", "fixed", "once"


@dataclass
class Setting:
    resume: str  # MAY, FIXED or ONCE
    runs: set  # the runs that take it


SETTINGS = {}  # dest -> Setting, filled by make_parser


def drop_rate(s):
    """argparse type for --p-drop-attr: 'uniform', 'balanced' or a probability."""
    if s in ("uniform", "balanced"):
        return s
    if not 0 <= float(s) <= 1:
        raise argparse.ArgumentTypeError(f"must be 'uniform', 'balanced' or in [0, 1], got {s}")
    return float(s)


def make_parser():
    """Each flag once: its default and help (argparse's), whether a --resume may change it, which runs take
    it."""
    p = util.Parser(description="Train a DDPM (denoising diffusion) on CelebA faces, or the autoencoder of "
                    "latent diffusion and a DDPM on its latents.",
                    epilog="--resume takes every setting from the checkpoint; only those marked [resume may "
                    "change] may differ (--data: a moved copy of the same images). CPU threads: one per idle "
                    "core, looked at again every 10 s; OMP_NUM_THREADS=N chooses.")

    def adder(title):
        """-> add(flag, resume, runs, **argparse's keywords), which adds a flag to the group `title`."""
        group = p.add_argument_group(title)
        def add(flag, resume, runs=ANY, **kw):
            if resume == MAY:
                kw["help"] += " [resume may change]"
            action = group.add_argument(flag, **kw)
            SETTINGS[action.dest] = Setting(resume, runs)
        return add

    add_model_flags(adder)
    add_run_flags(adder)
    return p


# the argparse types of the settings below: each refuses a bad value in one line
pos = util.positive(int)
real = util.positive(float)
fraction = util.between(0, 1)


def add_model_flags(adder):
    """The settings of the data, the model, the diffusion, latent diffusion and the attributes."""
    add = adder("data")
    add("--data", MAY, type=util.path, default="data", help="CelebA root (torchvision or Kaggle) or image "
        "folder")
    add("--download", ONCE, action="store_true", help="first try torchvision's CelebA download (needs gdown)")
    add("--size", FIXED, type=pos, default=64, help="image size; picks the U-Net preset")
    add("--crop", FIXED, default="auto", choices=data.CROPS, help="auto: the DDIM box on CelebA, else "
        "centred")
    add("--cache-dir", MAY, type=util.path, help="decoded images and latents (default: ~/.cache/ddpm-faces)")
    add("--no-flip", FIXED, action="store_true", help="no random horizontal flips")

    add = adder("model (default: the --size preset) and diffusion")
    add("--ch", FIXED, type=pos, help="base channels")
    add("--ch-mult", FIXED, {DIFFUSION}, type=util.int_list, help="channel multiplier per level, e.g. "
        "1,2,2,2")
    add("--num-res-blocks", FIXED, type=pos, help="residual blocks per level")
    add("--attn-res", FIXED, {DIFFUSION}, type=util.int_list, help="feature-map sizes with self-attention")
    add("--dropout", FIXED, {DIFFUSION}, type=util.real, help="dropout in the residual blocks")
    add("--timesteps", FIXED, {DIFFUSION}, type=util.between(2, math.inf, int), default=1000,
        help="T, the diffusion steps")
    add("--schedule", FIXED, {DIFFUSION}, default="linear", choices=SCHEDULES, help="beta schedule")
    add("--objective", FIXED, {DIFFUSION}, default="eps", choices=OBJECTIVES, help="what the network "
        "predicts")
    add("--min-snr-gamma", FIXED, {DIFFUSION}, type=real, help="min-SNR-gamma weighting")

    add = adder("latent diffusion: the autoencoder, then a DDPM on its latents")
    add("--autoencoder", FIXED, action="store_true", help="train the autoencoder (autoencoder.py) instead of "
        "a DDPM")
    add("--factor", FIXED, {AUTOENCODER}, type=int, default=4, choices=autoencoder.FACTORS,
        help="the autoencoder's downsampling factor f")
    add("--z-channels", FIXED, {AUTOENCODER}, type=pos, default=4, help="the latent's channels")
    add("--kl-weight", FIXED, {AUTOENCODER}, type=util.between(0, math.inf), default=autoencoder.KL_WEIGHT,
        help="the KL term's weight")
    add("--no-mid-attn", FIXED, {AUTOENCODER}, action="store_true", help="no self-attention in the "
        "autoencoder's middle")
    add("--latents", FIXED, {DIFFUSION}, type=util.path, metavar="AE_CKPT", help="train the DDPM on the "
        "latents of this autoencoder (its size and crop)")
    add("--posterior", FIXED, {LATENT}, default="mean", choices=["mean", "sample"], help="the latent of an "
        "image: the mean of q(z | x), or a sample of it each epoch")

    add = adder("attributes")
    add("--attrs", FIXED, {DIFFUSION}, help="condition on CelebA attributes: 'all' or names, e.g. "
        "Smiling,Male")
    add("--attr-film", FIXED, {DIFFUSION}, action="store_true", help="the attributes also scale and shift "
        "each block (FiLM)")
    add("--p-uncond", FIXED, {DIFFUSION}, type=fraction, default=0.1, help="probability of dropping the "
        "whole condition")
    add("--p-drop-attr", FIXED, {DIFFUSION}, type=drop_rate, default="uniform", help="probability of "
        "dropping each attribute, 'uniform' (U(0, 1) per image) or 'balanced' (REPORT sec. 3.7)")


def add_run_flags(adder):
    """The settings of how a run trains, how fast, and what it writes."""
    add = adder("optimisation")
    add("--epochs", MAY, type=pos, default=100, help="passes over the training split")
    add("--max-steps", MAY, type=pos, help="stop after this many steps (not --epochs)")
    add("--minutes", FIXED, type=util.positive(float, 525_600), help="fit the whole run into N minutes (a "
        "year at most)")
    add("--batch-size", FIXED, type=pos, default=128, help="global batch, split over the GPUs")
    add("--lr", FIXED, type=real, default=2e-4, help="peak AdamW learning rate")
    add("--warmup", FIXED, type=util.non_negative, default=5000, help="LR warm-up steps (at most a tenth of "
        "the run)")
    add("--lr-decay", FIXED, default="constant", choices=["constant", "cosine"], help="after the warm-up")
    add("--weight-decay", FIXED, type=util.between(0, math.inf), default=0.0, help="AdamW weight decay")
    add("--grad-clip", FIXED, type=real, default=1.0, help="clip the gradient norm to this")
    add("--ema-decay", FIXED, type=fraction, default=0.9999, help="EMA decay d, as min(d, (1+s)/(10+s))")
    add("--seed", FIXED, type=util.random_seed, help="random seed (default: drawn)")

    add = adder("speed")
    add("--device", MAY, help="cuda, mps or cpu (default: the first available)")
    add("--precision", MAY, default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast (auto: "
        "bf16 or fp16 on GPUs)")
    add("--compile", MAY, action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    add("--channels-last", MAY, action=argparse.BooleanOptionalAction, help="channels_last memory format "
        "(default: off for an eager GPU step)")
    add("--grad-checkpoint", MAY, default="auto", choices=["auto", "on", "off"], help="recompute each block "
        "in backward (auto: when a batch needs it)")

    add = adder("logging, evaluation and checkpoints")
    add("--out", MAY, type=util.path, default="out", help="folder for ckpt.pt, grids and log.csv")
    add("--overwrite", ONCE, action="store_true", help="replace the run in --out")
    add("--log-every", MAY, type=pos, default=100, help="a progress line every N steps")
    add("--sample-every", MAY, type=util.non_negative, default=5000, help="a sample grid every N steps (0: "
        "never)")
    add("--sample-steps", MAY, {DIFFUSION}, type=pos, default=DEFAULT_STEPS, help=f"the grids' "
        f"{DEFAULT_SAMPLER} steps")
    add("--sample-n", MAY, type=util.between(1, 1024, int), default=64, help="images in a grid")
    add("--eval-every", MAY, type=util.non_negative, default=5000, help="a validation loss every N steps (0: "
        "never)")
    add("--eval-images", MAY, type=pos, default=1024, help="validation images")
    add("--ckpt-every", MAY, type=util.non_negative, default=5000, help="write ckpt.pt every N steps (0: at "
        "the end)")
    add("--resume", ONCE, nargs="?", const="latest", type=util.path, help="continue a run (default: ckpt.pt "
        "in --out)")
    add("--other-data", ONCE, action="store_true", help="resume on other images than the run's")
    add("--dry-run", ONCE, action="store_true", help="check a setup: 2 steps of one image, then a checkpoint")

    add = adder("benchmark")
    add("--bench", ONCE, action="store_true", help="time training steps: img/s, MFU")
    add("--bench-steps", ONCE, {BENCH}, type=pos, default=20, help="timed steps for --bench")
    add("--peak-tflops", ONCE, {BENCH}, type=real, help="the device's peak TFLOP/s for MFU")


if __name__ == "__main__":
    main(started=STARTED)
