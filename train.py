"""
Train a DDPM on CelebA faces: one GPU, many (torchrun), MPS or CPU.

    python train.py --data data --size 64 --epochs 100
    torchrun --nproc_per_node=8 train.py --data data --size 64 --epochs 100
    python train.py --data data --size 32 --minutes 30   # the run that fits in 30 minutes here
    python train.py --resume --out out                   # continue the run in out/, with its settings
    python train.py --bench                              # img/s, TFLOP/s and MFU on synthetic data

Read from the top: `loop` is [DDPM] Algorithm 1, a step is `train_step`, what is due now and then is
`after_step`. Then the setup, data and model, and the extras: --minutes, memory, --bench, the flags. `cfg`
holds the settings, `env` the processes and device, `run` what the loop updates. Step s draws the whole
global batch's randomness from a generator seeded with (seed, s): a resume repeats the uninterrupted run,
on any number of GPUs.
"""
import os
# short OpenMP spinning: a core that another program uses costs its share, not every op (REPORT sec. 3.10)
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
import argparse
import copy
import dataclasses
import functools
import importlib.util
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import unet
import util
from diffusion import DEFAULT_ETA, DEFAULT_SAMPLER, DEFAULT_STEPS, OBJECTIVES, SCHEDULES, GaussianDiffusion
from util import UsageError, fmt_bytes, fmt_time

ERRORS = (UsageError, util.WriteError, util.CheckpointError, data.DataError)  # bad input
MIN_STEPS = 1500  # --minutes narrows the preset until this many steps fit (REPORT sec. 3.5)
FACE_STEPS = 1000  # 1,037 steps made faces (REPORT sec. 3.5); a plan of fewer gets a warning
COMPILE_SECONDS = 90  # torch.compile's warm-up of the 64 px preset on an H200 (REPORT sec. 3.10)
SMALLER = "use a smaller --size, --ch or --batch-size"

# -----------------------------------------------------------------------------
# the run: train -> loop -> train_step, then what is due


def main(argv=None):
    args, given = make_parser().parse(argv)
    with util.one_line_errors(ERRORS, "interrupted before training started; nothing to save"):
        code = train(args, given)
    if code:
        sys.exit(code)


def train(args, given):
    """The phases of a run. -> exit code."""
    cfg, env = setup(args, given)  # and every check that needs no data
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
        run = build(cfg, env, *load_data(cfg, env), given)
        if run.step >= run.plan.total:
            env.say(f"nothing to do: the checkpoint is at step {run.step}, where the run ends; raise "
                    "--max-steps or --epochs to train further")
            return 0
        at_once = not env.ddp and env.device.type != "cuda" and not env.compile  # a step can take minutes
        with util.StopSignals(env.signals, env.say, [run.ema, run.model] if at_once else [run.ema], at_once):
            return loop(cfg, env, run)
    finally:
        if env.ddp and dist.is_initialized():
            dist.destroy_process_group()
        util.release_folder(*env.claim)


def loop(cfg, env, run):
    """[DDPM] Algorithm 1 on a global batch of cfg.batch_size images, of which this rank takes a shard."""
    B, device = cfg.batch_size, env.device
    shard = slice(env.rank * B // env.world, (env.rank + 1) * B // env.world)
    gen = torch.Generator(device=device)  # re-seeded every step: all of a step's randomness
    run.model.train()
    while run.step < run.plan.total:  # line 6: until converged
        gen.manual_seed((cfg.seed * 1_000_003 + run.step) % 2**64)
        x0, attrs = run.batches.get(run.step, gen)  # line 2: x_0 ~ q(x_0), (B/world, 3, H, W) in [-1, 1]
        t = torch.randint(0, cfg.timesteps, (B,), generator=gen, device=device)[shard]  # 3: t ~ U(0..T-1)
        noise = torch.randn((B, *x0.shape[1:]), generator=gen, device=device)[shard]  # 4: eps ~ N(0, I)
        cond = condition(attrs, gen, cfg, shard, run.rare) if attrs is not None else None
        rng = torch.get_rng_state()  # dropout's: a step that a signal cuts short is rolled back
        try:
            loss = train_step(run, x0, t, noise, cond, lr_at(run.step, cfg.lr, run.plan))  # line 5
        except util.Interrupted:  # weights, optimizer and RNG stay those of run.step
            run.opt.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            return after_step(cfg, env, run, None)
        run.step += 1
        code = after_step(cfg, env, run, loss)  # progress, --minutes, evaluations, checkpoints, signals
        if code is not None:
            return code
    return 0


def train_step(run, x0, t, noise, attrs, lr):
    """One AdamW step on L_simple = ||eps - eps_theta(x_t, t)||^2 ([DDPM] eq. 14), then the EMA. attrs: the
    condition, or None. -> the loss, a tensor (reading it would wait for the device)."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    fmt = run.memory_format
    model = run.fwd if attrs is None else functools.partial(run.fwd, attrs=attrs)
    with run.ctx:  # autocast
        loss = run.diffusion.training_losses(model, x0.contiguous(memory_format=fmt), t,
                                             noise.contiguous(memory_format=fmt)).mean()
    run.scaler.scale(loss).backward()  # the scaler is a no-op unless fp16
    run.scaler.unscale_(run.opt)  # clipping sees the true gradient
    torch.nn.utils.clip_grad_norm_(run.params, run.grad_clip)
    run.scaler.step(run.opt)
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
    0 dropped. `balanced` keeps an attribute in its rarer state unless all are dropped."""
    B, K, device = cfg.batch_size, attrs.shape[1], attrs.device
    uniform = cfg.p_drop_attr in ("uniform", "balanced")
    rate = torch.rand(B, 1, generator=gen, device=device) if uniform else cfg.p_drop_attr
    keep = (torch.rand(B, K, generator=gen, device=device) >= rate)[shard]  # each attribute on its own
    if cfg.p_drop_attr == "balanced":
        keep |= attrs == rare
    keep &= (torch.rand(B, 1, generator=gen, device=device) >= cfg.p_uncond)[shard]  # the whole condition
    return (attrs.float() * 2 - 1) * keep


def after_step(cfg, env, run, loss):
    """What is due after a step (loss None: one cut short): the --minutes plan, a progress line, the
    validation loss and grid, the checkpoint. -> the exit code, or None."""
    if loss is not None:
        run.loss_sum, run.loss_n = run.loss_sum + loss, run.loss_n + 1
        if math.isinf(run.plan.total):
            plan_minutes(cfg, env, run)  # --minutes: times the first steps, then sets the plan
    last = run.step >= run.plan.total
    stop = (env.signals or [signal.SIGTERM])[0] if util.on_any_rank(env.signals, env.ctrl) else None
    if loss is not None and (run.step % cfg.log_every == 0 or last or stop or run.step in (1, 10)):
        progress(cfg, env, run)
    t0 = time.time()
    if not stop and env.master:
        evaluate(cfg, env, run, last)
    if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or last or stop:
        save(cfg, env, run, last, stop)
    run.t_log += time.time() - t0  # not training time
    return 128 + stop if stop else None  # the shell's code for a death by that signal


def save(cfg, env, run, last, stop):
    """The checkpoint, written by rank 0, and what goes with it."""
    loss_sum = util.mean_over_ranks(run.loss_sum)  # on every rank; a resume continues it
    if not env.master:
        return
    path, took = os.path.join(cfg.out, "ckpt.pt"), fmt_time(time.time() - env.t_start)
    run.elapsed = time.time() - run.t0
    saved = checkpoint(cfg, env, run, path, loss_sum)
    env.say(f"step {run.step} | " + (f"checkpoint {path}" if saved else "weights not finite: not saved"))
    if last and cfg.minutes and not env.ckpt:
        env.say(f"--minutes {cfg.minutes:g}: the run took {took} from start to this checkpoint")
    if last and cfg.dry_run:
        env.say(f"dry run: the setup works ({took}; a checkpoint of {fmt_bytes(os.path.getsize(path))})")
    if stop:
        env.say(f"interrupted by {util.signal_name(stop)} at step {run.step}" + (
            f"; checkpoint written. Continue with: python train.py --resume --out {shlex.quote(cfg.out)}"
            if saved else ""))


def checkpoint(cfg, env, run, path, loss_sum):
    """One self-describing file, written atomically; non-finite weights are not (-> False)."""
    sd = run.model.state_dict()
    if not all(torch.isfinite(v).all() for v in sd.values()):
        return False
    cuda_rng = torch.cuda.get_rng_state() if env.device.type == "cuda" else None
    util.save_checkpoint(dict(
        format=util.CKPT_FORMAT, args=vars(cfg), plan=dataclasses.asdict(run.plan),
        model_args=unet.config_dict(run.model.cfg), model=sd, ema=run.ema.state_dict(),
        optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict(), step=run.step,
        epoch=run.step // run.batches.steps_per_epoch, world_size=env.world, data_id=run.data_id,
        train_images=len(run.batches.images), elapsed=run.elapsed, loss_sum=loss_sum, loss_n=run.loss_n,
        rng=dict(torch=torch.get_rng_state(), cuda=cuda_rng)), path)
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
    claim: tuple = (None, ())  # rank 0's lock on --out, and the folders it made

    @property
    def master(self):
        return self.rank == 0


@dataclass
class Plan:
    """The schedule (total: inf until --minutes has timed the steps); grids at grid_from + k * grid_every
    and the end."""
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
    diffusion: GaussianDiffusion
    ctx: object
    memory_format: torch.memory_format
    grad_clip: float
    plan: Plan
    batches: data.Batches = None
    val: tuple = None  # rank 0: (validation images in [-1, 1], attributes or None)
    step: int = 0
    elapsed: float = 0.0  # seconds of training, across resumes
    loss_sum: torch.Tensor = None  # summed since the last multiple of --log-every
    loss_n: int = 0
    rare: torch.Tensor = None  # (K,) each attribute's rarer state
    data_id: str = None  # data.identity of the training images
    t0: float = 0.0  # time.time() - elapsed at the start
    t_log: float = 0.0  # when the next progress line's steps began, less evaluation time
    step_log: int = 0
    probe: tuple = None  # --minutes: (step, time) where the timing began
    forward_s: float = None  # --minutes: seconds of an EMA forward pass per image
    log: object = None  # rank 0: log.csv

    def __post_init__(self):
        self.params, self.ema_params = list(self.model.parameters()), list(self.ema.parameters())

# -----------------------------------------------------------------------------
# what is due now and then: progress lines, validation, sample grids


def progress(cfg, env, run):
    """A progress line and a row of log.csv; a loss that is not finite ends the run."""
    now = time.time()
    rate = (run.step - run.step_log) / max(now - run.t_log, 1e-9)  # steps/s since the last line
    if run.probe and not math.isinf(run.plan.total) and run.step < 0.95 * run.plan.total:
        replan(cfg, env, run, rate)  # --minutes: the machine got slower or faster
    loss = util.mean_over_ranks(run.loss_sum) / run.loss_n
    if not math.isfinite(loss):
        path = os.path.join(cfg.out, "ckpt.pt")
        kept = f"the last good checkpoint {path} was kept" if os.path.exists(path) else "nothing was saved"
        raise SystemExit(f"error: the loss became {loss} by step {run.step}: training diverged; {kept}. "
                         "Lower --lr, raise --warmup, or use --precision bf16/fp32.")
    epoch, total, lr = run.step // run.batches.steps_per_epoch, run.plan.total, run.opt.param_groups[0]["lr"]
    eta = "timing the first steps" if math.isinf(total) else fmt_time((total - run.step) / max(rate, 1e-9))
    env.say(f"epoch {epoch} | step {run.step}/{'?' if math.isinf(total) else total} | loss {loss:.4f} | "
            f"{rate * cfg.batch_size:,.1f} img/s | lr {lr:.2e} | ETA {eta}")
    log_row(run, loss=f"{loss:.6f}", lr=f"{lr:.3e}", img_per_s=f"{rate * cfg.batch_size:.1f}")
    if run.step % cfg.log_every == 0:  # the loss column averages the steps since the last multiple
        run.loss_sum, run.loss_n = torch.zeros((), device=env.device), 0
    run.t_log, run.step_log = now, run.step


def evaluate(cfg, env, run, last):
    """Rank 0: the validation loss and the fixed-noise sample grid when due (a signal cuts them short)."""
    every = run.plan.grid_every
    try:
        if run.val is not None and (run.step % cfg.eval_every == 0 or last):
            vl = val_loss(cfg, env, run)
            env.say(f"step {run.step} | val loss {vl:.4f} ({len(run.val[0])} images, EMA weights)")
            log_row(run, val_loss=f"{vl:.6f}")
        due = every > 0 and (run.step - run.plan.grid_from) % every == 0
        if due or (last and (every > 0 or cfg.dry_run)):
            env.say(f"step {run.step} | samples {sample_grid(cfg, env, run)}")
    except util.Interrupted:
        env.say(f"step {run.step} | evaluation or sample grid cut short by the signal")


def log_row(run, **values):
    """A row of log.csv (rank 0)."""
    if run.log:
        run.log(step=run.step, epoch=run.step // run.batches.steps_per_epoch,
                elapsed_s=f"{time.time() - run.t0:.1f}", **values)


@torch.no_grad()
def sample_grid(cfg, env, run):
    """The EMA model's samples from the same noise at every call (x_T and every later z)."""
    x_T = torch.randn(cfg.sample_n, 3, cfg.size, cfg.size, generator=torch.Generator().manual_seed(cfg.seed))
    g, images, t0 = torch.Generator(device=env.device).manual_seed(cfg.seed + 1), [], time.time()
    todo = len(x_T) * len(run.diffusion.timesteps(DEFAULT_SAMPLER, cfg.sample_steps))
    progress, done = util.Progress(todo, "sample grid", "image-steps", env.say, last=False), [0]
    for x in x_T.to(env.device).split(cfg.batch_size // env.world):
        def count(*_):
            done[0] += len(x)
            progress(done[0])
        with run.ctx:
            images.append(run.diffusion.sample(run.ema, x.shape, DEFAULT_SAMPLER, cfg.sample_steps,
                                               DEFAULT_ETA, g, x_T=x, callback=count))
    run.forward_s = (time.time() - t0) / todo  # --minutes prices grids and validation with it
    path = os.path.join(cfg.out, f"samples_{run.step:07d}.png")
    util.save_image(data.to_uint8(torch.cat(images)), path, "--out", nrow=round(math.sqrt(cfg.sample_n)))
    return path


@torch.no_grad()
def val_loss(cfg, env, run):
    """L_simple of the EMA weights on the validation images, with the same t and noise every time."""
    (images, attrs), g = run.val, torch.Generator(device=env.device).manual_seed(0)
    losses, b = [], cfg.batch_size // env.world
    for i in range(0, len(images), b):
        x0 = images[i:i + b]
        t = torch.randint(0, cfg.timesteps, (len(x0),), generator=g, device=env.device)
        model = run.ema if attrs is None else functools.partial(run.ema, attrs=attrs[i:i + b])
        with run.ctx:
            noise = torch.randn(x0.shape, generator=g, device=env.device)
            losses.append(run.diffusion.training_losses(model, x0, t, noise))
    return torch.cat(losses).mean().item()


# -----------------------------------------------------------------------------
# setup: settings, processes, device, --out, the checks that need no data


def setup(args, given):
    """-> (cfg, env): the flags (or the checkpoint's), and what is resolved before the run."""
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    env = Env(ddp, rank, world, int(os.environ.get("LOCAL_WORLD_SIZE", 1)), time.time(), args.out)
    # rank 0 prints; once stdout is gone, into --out/stdout.log, and the run stops with a checkpoint
    env.say = util.Say(lambda: os.path.join(env.out, "stdout.log") if os.path.isdir(env.out) else None,
                       lambda: env.signals.append(util.SIGPIPE)) if env.master else lambda *a, **k: None
    cfg = resumed(args, given, env) if args.resume else argparse.Namespace(**vars(args))
    check_args(cfg, given, env)
    minutes = cfg.minutes and not cfg.resume
    cfg = replace(cfg, data=os.path.abspath(cfg.data), out=os.path.abspath(cfg.out),
                  lr_decay="cosine" if minutes and "lr_decay" not in given else cfg.lr_decay,  # ends at 0
                  sample_every=None if minutes and "sample_every" not in given else cfg.sample_every,
                  sample_steps=min(cfg.sample_steps, cfg.timesteps))
    if cfg.dry_run:  # quick at any size
        cfg = replace(cfg, batch_size=world, sample_steps=min(cfg.sample_steps, 2), sample_n=1, eval_images=2)
    device = util.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)), env.local_world)
    env.out, env.device, cuda = cfg.out, device, device.type == "cuda"
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        env.ctrl = dist.new_group(backend="gloo") if cuda else None  # agreeing never waits for the GPU
    env.precision, env.ctx = util.autocast(device, cfg.precision)
    compiles = cuda and importlib.util.find_spec("triton") is not None and not cfg.dry_run
    env.compile = cfg.compile if cfg.compile is not None else compiles
    # an eager GPU step measured faster in NCHW, a compiled one in channels_last (REPORT sec. 3.10)
    env.channels_last = cfg.channels_last if cfg.channels_last is not None else not cuda or env.compile
    util.check_fits(unet.config_from_dict(env.ckpt["model_args"]) if env.ckpt else model_config(cfg), device,
                    "use a smaller --ch or --size")
    torch.backends.cudnn.benchmark = True
    if cfg.seed is None:  # rank 0's: every rank shuffles alike
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
        cfg = replace(cfg, seed=int(util.from_rank0(seed, env.ctrl)))
    torch.manual_seed(cfg.seed + rank)  # dropout; the rest comes from a generator per step
    threads = util.set_threads(device, env.local_world, env.say)
    threads = f" ({threads} threads)" if device.type == "cpu" else ""
    env.say(f"device {device} x {world} process{'es' if world > 1 else ''}{threads}, {env.precision}, "
            f"compile {env.compile}, channels_last {env.channels_last}, seed {cfg.seed}")
    if not cfg.bench:
        check_out(cfg, env)
    return cfg, env


def replace(cfg, **changes):
    """A copy of the settings with `changes` (never changed in place)."""
    return argparse.Namespace(**{**vars(cfg), **changes})


# the flags a --resume may change; every other setting is the checkpoint's
RESUME_MAY_CHANGE = ("data", "cache_dir", "epochs", "max_steps", "log_every", "sample_every", "sample_steps",
                     "sample_n", "eval_every", "eval_images", "ckpt_every", "out", "device", "precision",
                     "compile", "channels_last", "grad_checkpoint", "peak_tflops")
NOT_FROM_CHECKPOINT = ("resume", "overwrite", "dry_run", "bench", "bench_steps", "download", "other_data")


def resumed(args, given, env):
    """--resume: every setting from the checkpoint (env.ckpt); a flag that contradicts it is refused."""
    if args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: drop one of them")
    path = os.path.join(args.out, "ckpt.pt") if args.resume == "latest" else args.resume
    env.ckpt = ckpt = util.load_checkpoint(path)
    if not all(k in ckpt for k in ("args", "optimizer", "scaler")):
        raise util.CheckpointError(f"{path} lacks the optimizer state that a resume needs; sample from it "
                                   "with sample.py, or start a new run")
    cfg = vars(args).copy()
    if "out" not in given and args.resume != "latest":  # in the checkpoint's folder
        cfg["out"] = path if os.path.isdir(path) else os.path.dirname(path) or "."
    for k, v in ckpt["args"].items():
        v = tuple(v) if isinstance(v, list) else v
        if k in NOT_FROM_CHECKPOINT or k == "out" or k not in cfg:
            continue
        if k in given and k not in RESUME_MAY_CHANGE and cfg[k] != v:
            flag = "--" + k.replace("_", "-")
            show = lambda x: ",".join(map(str, x)) if isinstance(x, tuple) else x
            raise UsageError(f"{flag} {show(cfg[k])} contradicts the checkpoint's {show(v)} ({path}); drop "
                             f"{flag} to continue the run, or start a new run in another --out")
        if k not in given:
            cfg[k] = v
    if "epochs" in given and "max_steps" not in given:  # extended by epochs: not the saved --max-steps
        cfg["max_steps"] = None
    env.say(f"resuming from {path} at step {ckpt['step']}")
    return argparse.Namespace(**cfg)


def check_args(cfg, given, env):
    """Everything that can be checked without data: a mistake costs seconds, not a decode."""
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
        (loose and not cfg.attrs, f"--{loose} sets how a conditional model drops its attributes; add "
         "--attrs NAMES, or drop it"),
        (cfg.sample_steps > cfg.timesteps and "sample_steps" in given,
         f"--sample-steps {cfg.sample_steps} is more than --timesteps {cfg.timesteps}; lower it"),
        (cfg.batch_size % env.world, f"--batch-size {cfg.batch_size} must be divisible by the number of "
         f"processes ({env.world})"),
    ]:
        if bad:
            raise UsageError(message)
    if cfg.lr > 1e-2 and not cfg.resume:
        env.say(f"note: --lr {cfg.lr:g} is far above what diffusion U-Nets train with: expect it to diverge")
    base = max([s for s in unet.PRESETS if s <= cfg.size] or [min(unet.PRESETS)])
    try:
        unet.check_config(model_config(cfg))
    except ValueError as e:
        field_, message = e.args
        flag = "--" + ("size" if field_ == "image_size" else field_.replace("_", "-"))
        origin = "" if field_ == "image_size" or field_ in given else f" (the --size {base} preset's)"
        raise UsageError(f"{flag}{origin} {message}")
    if cfg.size not in unet.PRESETS and not env.ckpt:
        env.say(f"model: --size {cfg.size} takes the --size {base} preset (--ch, --ch-mult, "
                "--num-res-blocks, --attn-res, --dropout override it)")


def check_out(cfg, env):
    """--out: writable, without another run unless resumed (--overwrite removes it), locked."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out}: is a file; give a folder for checkpoints and samples")
    if not env.master:
        return
    stale = util.check_writable(cfg.out, "--out")
    old = [f for f in sorted(os.listdir(cfg.out)) if f in ("ckpt.pt", "log.csv", "stdout.log")
           or (f.startswith("samples_") and f.endswith(".png"))] if os.path.isdir(cfg.out) else []
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


def load_data(cfg, env):
    """-> (the training split, (validation images, attributes) or None, the data's identity)."""
    sel = data.select(cfg.data, "train", log=env.say)
    n, data_id, saved = len(sel["files"]), data.identity(sel), env.ckpt and env.ckpt.get("data_id")
    if n < cfg.batch_size:
        raise UsageError(f"--data {cfg.data}: the train split has {n:,} images, fewer than --batch-size "
                         f"{cfg.batch_size}; lower --batch-size")
    if saved and saved != data_id and not cfg.other_data:
        raise UsageError(f"--data {cfg.data} ({n:,} images) is not the data the checkpoint's run trained on "
                         f"({env.ckpt['train_images']:,}); resume with it, or pass --other-data")
    if env.master and not (env.ckpt or cfg.minutes or cfg.dry_run) and env.device.type != "cuda":
        estimate_run(cfg, env, n)
    if env.ddp and not env.master:
        dist.barrier()  # rank 0 writes the cache first, the others load it
    faces = data.load(cfg.data, cfg.size, "train", cfg.crop, cfg.cache_dir, log=env.say, attrs=cfg.attrs,
                      sel=sel)
    if env.ddp and env.master:
        dist.barrier()
    val = None
    if env.master and cfg.eval_every > 0:
        try:
            v = data.load(cfg.data, cfg.size, "valid", cfg.crop, cfg.cache_dir, log=env.say, attrs=cfg.attrs)
            n = cfg.eval_images
            val = (data.to_float(v["images"][:n], env.device),  # every attribute given
                   v["cond"][:n].to(env.device).float() * 2 - 1 if cfg.attrs else None)
        except data.DataError as e:
            env.say(f"no validation loss: {e}")
    return faces, val, data_id


def build(cfg, env, faces, val, data_id, given):
    """The Run: make_run, the memory plan, the batches, the plan and the log."""
    attrs = tuple(faces["cond_names"] or ())
    net = unet.config_from_dict(env.ckpt["model_args"]) if env.ckpt else model_config(cfg, attrs)
    if tuple(net.attrs) != attrs:
        raise UsageError(f"the checkpoint's model is conditioned on {','.join(net.attrs) or 'nothing'}, "
                         f"--data {cfg.data} on {','.join(attrs) or 'nothing'}; resume with the run's data")
    run = make_run(cfg, env, net)
    resident = data.fits_on_gpu(faces["images"].nbytes, env.device)
    plan_memory(cfg, env, run, faces["images"].nbytes if resident else 0)
    run.batches = data.Batches(faces["images"], cfg.batch_size, env.device, cfg.seed, env.rank, env.world,
                               flip=not cfg.no_flip, attrs=faces["cond"], resident=resident)
    run.plan = make_plan(cfg, env, run.step, run.batches.steps_per_epoch, given)
    run.val, run.data_id = val, data_id
    if faces["cond"] is not None:
        run.rare = (faces["cond"].float().mean(0) < 0.5).to(env.device, torch.uint8)
    steps = "planned once timed" if math.isinf(run.plan.total) else f"{run.plan.total:,}"
    short = run.plan.warmup < cfg.warmup and not (env.ckpt or cfg.dry_run) and math.isfinite(run.plan.total)
    env.say(f"data: {len(faces['images']):,} training images, {run.batches.steps_per_epoch:,} steps per "
            f"epoch at batch {cfg.batch_size}; steps: {steps}, lr warm-up {run.plan.warmup:,}"
            + (f" (--warmup {cfg.warmup} is more than a tenth of the run)" if short else ""))
    if env.master:  # each step once: a resume keeps the rows up to its step
        run.log = util.CsvLog(os.path.join(cfg.out, "log.csv"), ["step", "epoch", "loss", "val_loss", "lr",
                              "img_per_s", "elapsed_s"], run.step if env.ckpt else None, "--out")
    run.t0 = run.t_log = time.time() - run.elapsed
    run.step_log = run.step
    return run


def make_run(cfg, env, net):
    """Model, EMA, AdamW, GradScaler, diffusion (the checkpoint's on resume). -> Run, without data."""
    ckpt, device = env.ckpt, env.device
    model = unet.UNet(net).to(device)
    if env.channels_last:
        util.to_channels_last(model)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=fused_adamw(device))
    scaler = torch.amp.GradScaler(device.type, enabled=env.precision == "fp16")
    fwd = torch.compile(model) if env.compile else model  # state dicts from `model`: no _orig_mod.
    fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None) if env.ddp else fwd
    diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule, cfg.objective, cfg.min_snr_gamma).to(device)
    fmt = torch.channels_last if env.channels_last else torch.contiguous_format
    plan = Plan(math.inf, cfg.warmup, cfg.lr_decay, cfg.ema_decay)
    run = Run(model, fwd, ema, opt, scaler, diffusion, env.ctx, fmt, cfg.grad_clip, plan,
              loss_sum=torch.zeros((), device=device))
    if ckpt:
        util.restore(ckpt, model, ema, opt, scaler)
        if ckpt.get("world_size") == env.world:  # dropout continues exactly
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        else:
            torch.manual_seed(cfg.seed + env.rank + ckpt["step"])
        run.step, run.elapsed, run.loss_n = ckpt["step"], ckpt.get("elapsed", 0.0), ckpt.get("loss_n", 0)
        run.loss_sum += ckpt.get("loss_sum", 0.0)
    env.say(f"model: {model.num_params() / 1e6:.2f}M parameters, {net}")
    return run


def fused_adamw(device):
    """Whether AdamW runs fused (the whole update in a few kernels): on GPUs."""
    return device.type == "cuda"


def make_plan(cfg, env, step, steps_per_epoch, given):
    """The schedule; a resume keeps the warm-up and EMA decay (and a --minutes run its end)."""
    saved = env.ckpt and env.ckpt.get("plan")
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
    grid_every = 0 if cfg.sample_every is None and math.isinf(total) else grids_every(cfg, total)
    if saved:
        return Plan(total, saved["warmup"], cfg.lr_decay, saved["ema_decay"], grid_every)
    warmup = cfg.warmup if math.isinf(total) else min(cfg.warmup, total // 10)  # at most a tenth
    return Plan(total, warmup, cfg.lr_decay, cfg.ema_decay, grid_every)


def model_config(cfg, attrs=()):
    return unet.preset(cfg.size, ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks,
                       attn_res=cfg.attn_res, dropout=cfg.dropout, attr_film=cfg.attr_film, attrs=attrs)

# -----------------------------------------------------------------------------
# --minutes: fit the run into a time budget


def estimate_run(cfg, env, n_images):
    """A new CPU or MPS run, before decoding: how long it takes (past a day: the 30-minute command)."""
    steps = cfg.max_steps or cfg.epochs * (n_images // cfg.batch_size)
    one = util.time_step(model_config(cfg), 1, env.device, env.ctx, SMALLER)  # seconds for one image
    per_step = cfg.batch_size // env.world * one
    env.say(f"estimate: {steps:,} steps of {cfg.batch_size} images at ~{per_step:.1f} s each on this "
            f"{env.device.type}: about {fmt_time(steps * per_step)}" + (
                "; far beyond a day here. For faces on this machine in 30 minutes: python train.py --data "
                f"{shlex.quote(cfg.data)} --size 32 --minutes 30" if steps * per_step > 86400 else ""))


def fit_model_to_minutes(cfg, env, given):
    """--minutes without --ch or --batch-size: the preset's width and batch, halved together until MIN_STEPS
    fit the budget, but only to a model faster per image (a small GPU step is bound by its launches). A
    narrowed model gets dropout 0 and the lr times the width ratio, unless --lr is given (REPORT sec. 3.5)."""
    base = model_config(cfg)
    candidates = [(base.ch >> k, cfg.batch_size >> k) for k in range(3)
                  if base.ch >> k >= 32 and cfg.batch_size >> k >= 8 * env.world]
    budget = cfg.minutes * 60 - (COMPILE_SECONDS if env.compile else 0)
    net_of = lambda ch: dataclasses.replace(base, ch=ch, dropout=base.dropout if ch == base.ch else 0.0)
    per_step = {}  # candidate -> seconds per step, from the smallest
    for i in reversed(range(len(candidates))):
        if i + 1 in per_step and env.device.type != "cuda" and 8 * per_step[i + 1] * MIN_STEPS > budget:
            break  # on a CPU: a wider one, 8 times the work, cannot fit
        ch, b = candidates[i]
        per_step[i] = util.time_step(net_of(ch), b // env.world, env.device, env.ctx, SMALLER)
    per_image = {i: s / candidates[i][1] for i, s in per_step.items()}
    faster = [i for i in sorted(per_step) if all(per_image[i] < per_image[j] for j in per_image if j < i)]
    fits = [i for i in faster if budget / per_step[i] >= MIN_STEPS]
    ch, b = candidates[int(util.from_rank0(fits[0] if fits else min(faster, key=per_image.get), env.ctrl))]
    env.say(f"--minutes {cfg.minutes:g}: --ch {ch} --batch-size {b} --dropout {net_of(ch).dropout:g} of "
            f"{', '.join(f'{c}/{bb}' for c, bb in candidates)} (channels/batch): " + (
                f"the widest that leaves >= {MIN_STEPS:,} steps" if fits else "the fastest per image"))
    lr = cfg.lr if "lr" in given else cfg.lr * base.ch / ch  # the preset's width over the model's
    if lr != cfg.lr:
        env.say(f"--minutes {cfg.minutes:g}: --lr {lr:g}, {cfg.lr:g} times {base.ch}/{ch}")
    return replace(cfg, ch=ch, batch_size=b, dropout=net_of(ch).dropout, lr=lr)


def plan_minutes(cfg, env, run):
    """--minutes, until there is a plan: time the steps after the first two (compilation, autotuning), and
    plan after 10 steps and 10 s (2% of a short budget)."""
    util.synchronize(env.device)
    if run.probe is None:
        run.probe = (run.step + 2, None)
    if run.step == run.probe[0]:
        run.probe = (run.step, time.time())
    seconds = time.time() - (run.probe[1] or math.inf)
    if run.probe[1] and run.step - run.probe[0] >= 10 and seconds >= min(10, 1.2 * cfg.minutes):
        if env.master:
            b = min(cfg.sample_n, cfg.batch_size // env.world)  # the grids' batch
            run.forward_s = util.time_forward(run.ema, b, cfg.size, env.device, run.ctx)
        replan(cfg, env, run, (run.step - run.probe[0]) / seconds)


def replan(cfg, env, run, rate):
    """--minutes: the steps that fit the budget at `rate` steps/s, a warm-up of a tenth, the EMA over the last
    tenth, a grid each quarter (or now and three more); moved when the speed changes by 2%."""
    per_step, final = budget_terms(cfg, run, rate)
    left = cfg.minutes * 60 - (time.time() - env.t_start) - final
    total = int(util.from_rank0(run.step + max(1, int(0.98 * left / per_step)), env.ctrl))  # rank 0's plan
    first = math.isinf(run.plan.total)
    if not first and abs(total - run.plan.total) <= 0.02 * run.plan.total:
        return
    start = run.step if first and -(-total // 4) <= run.step else 0 if first else run.plan.grid_from
    warmup = min(cfg.warmup, total // 10) if first else run.plan.warmup
    every = grids_every(cfg, total - start, 3 if start else 4)
    run.plan = Plan(total, warmup, cfg.lr_decay, min(cfg.ema_decay, 1 - 10 / total), every, start)
    p = run.plan
    env.say(f"--minutes {cfg.minutes:g}: {rate * cfg.batch_size:,.1f} img/s{'' if first else ' now'}: "
            f"{total:,} steps in all ({total / run.batches.steps_per_epoch:.2f} epochs), lr warm-up "
            f"{p.warmup:,} steps then {cfg.lr_decay} decay, EMA decay {p.ema_decay:.5f}")
    if first and total < FACE_STEPS and env.master:
        need = time.time() - env.t_start + (FACE_STEPS - run.step) * per_step + final
        env.say(f"--minutes {cfg.minutes:g}: {total:,} steps are too few for faces ({FACE_STEPS:,} take "
                f"about --minutes {math.ceil(need / 60)} on this machine); the samples may be mostly noise")


def grids_every(cfg, steps, grids=4):
    """--sample-every, or for a --minutes plan `steps` in `grids` parts, rounded up."""
    return cfg.sample_every if cfg.sample_every is not None else -(-steps // grids)


def budget_terms(cfg, run, rate):
    """-> (seconds per step with its share of grids and validations, seconds of the last ones), from the
    timed forward pass (or a third of a step)."""
    fwd = run.forward_s or 1 / (3 * cfg.batch_size * rate)
    grid = cfg.sample_n * cfg.sample_steps * fwd if cfg.sample_every != 0 else 0
    val = 2 * len(run.val[0]) * fwd if run.val is not None else 0
    per_step = 1 / rate + (grid / cfg.sample_every if cfg.sample_every else 0)
    per_step += val / cfg.eval_every if val else 0
    return per_step, (4 if cfg.sample_every is None else 1) * grid + val


def plan_memory(cfg, env, run, resident_bytes=0):
    """The memory plan of a step of this run's model (util.plan_memory)."""
    x = torch.zeros(1, 3, cfg.size, cfg.size, device=env.device)
    loss = lambda x: run.diffusion.training_losses(run.model, x, torch.zeros(len(x), dtype=torch.long,
                                                                            device=env.device), x)
    util.plan_memory(run.model, loss, x, cfg.batch_size, env.world, cfg.grad_checkpoint, env.ctx, env.say,
                     (20 + 4 * env.ddp) * run.model.num_params() + resident_bytes)

# -----------------------------------------------------------------------------
# --bench: the speed of a training step


def bench(cfg, env):
    """Time training steps on synthetic data; count their FLOPs with torch.utils.flop_counter."""
    device, b = env.device, cfg.batch_size // env.world
    run = make_run(cfg, env, model_config(cfg))
    plan_memory(cfg, env, run)
    x0 = torch.rand(b, 3, cfg.size, cfg.size, device=device) * 2 - 1

    def steps(n):
        for _ in range(n):
            t = torch.randint(0, cfg.timesteps, (b,), device=device)
            train_step(run, x0, t, torch.randn_like(x0), None, cfg.lr)
            run.step += 1

    t = torch.randint(0, cfg.timesteps, (b,), device=device)
    loss = lambda: run.diffusion.training_losses(run.model, x0, t, x0).mean()
    flops = util.count_flops(run.model, loss, env.ctx)
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
    dt, host = (time.time() - t0) / cfg.bench_steps, []
    for _ in range(3):  # the host's time to issue a step to an idle device: near dt, launches bound it
        t0 = time.time()
        steps(1)
        host.append(time.time() - t0)
        util.synchronize(device)
    peak, tflops = cfg.peak_tflops or util.peak_tflops(device), flops / dt / 1e12
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
    bound = ", launch-bound" if min(host) > 0.8 * dt and device.type != "cpu" else ""
    env.say(f"bench: {util.device_name(device)} | size {cfg.size} | batch {b}/process x {env.world} | "
            f"{env.precision} | compile {env.compile} | channels_last {env.channels_last} | activation "
            f"checkpointing {run.model.grad_checkpoint} | warm-up {warmup:.1f}s")
    env.say(f"bench: {b * env.world / dt:,.1f} img/s | {dt * 1e3:.1f} ms/step (host {min(host) * 1e3:.1f} ms "
            f"to issue one{bound}) | peak memory {mem} | {flops / b / 1e9:.2f} GFLOP/img (fwd+bwd) | "
            f"{tflops:.2f} TFLOP/s/process | " + (f"MFU {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s"
                                                  if peak else "MFU n/a (pass --peak-tflops)"))
    return 0

# -----------------------------------------------------------------------------
# the flags


def drop_rate(s):
    """argparse type for --p-drop-attr: 'uniform', 'balanced' or a probability."""
    if s in ("uniform", "balanced"):
        return s
    if not 0 <= float(s) <= 1:
        raise argparse.ArgumentTypeError(f"must be 'uniform', 'balanced' or in [0, 1], got {s}")
    return float(s)


def make_parser():
    """The flags of the data, the model and its attributes; then add_run_flags."""
    may = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
    p = util.Parser(description="Train a DDPM (denoising diffusion) on CelebA faces.",
                    epilog=f"--resume takes every setting from the checkpoint; only these may change: {may} "
                           "(--data: a moved copy of the same images). CPU threads: one per idle core; "
                           "OMP_NUM_THREADS=N chooses.")
    pos, path, fraction = util.positive(int), util.path, util.between(0, 1)
    add = p.add_argument_group("data").add_argument
    add("--data", type=path, default="data", help="CelebA root (torchvision or Kaggle) or image folder")
    add("--download", action="store_true", help="first try torchvision's CelebA download (needs gdown)")
    add("--size", type=pos, default=64, help="image size; picks the U-Net preset")
    add("--crop", default="auto", choices=data.CROPS, help="auto: the DDIM box on CelebA, else centred")
    add("--cache-dir", type=path, help="decoded images (default: ~/.cache/ddpm-faces)")
    add("--no-flip", action="store_true", help="no random horizontal flips")
    add = p.add_argument_group("model (default: the --size preset) and diffusion").add_argument
    add("--ch", type=pos, help="base channels")
    add("--ch-mult", type=util.int_list, help="channel multiplier per level, e.g. 1,2,2,2")
    add("--num-res-blocks", type=pos, help="residual blocks per level")
    add("--attn-res", type=util.int_list, help="feature-map sizes with self-attention")
    add("--dropout", type=util.real, help="dropout in the residual blocks")
    add("--timesteps", type=util.between(2, math.inf, int), default=1000, help="T, the diffusion steps")
    add("--schedule", default="linear", choices=SCHEDULES, help="beta schedule")
    add("--objective", default="eps", choices=OBJECTIVES, help="what the network predicts")
    add("--min-snr-gamma", type=util.positive(float), help="min-SNR-gamma weighting")
    add = p.add_argument_group("attributes").add_argument
    add("--attrs", help="condition on CelebA attributes: 'all' or names, e.g. Smiling,Male")
    add("--attr-film", action="store_true", help="the attributes also scale and shift each block (FiLM)")
    add("--p-uncond", type=fraction, default=0.1, help="probability of dropping the whole condition")
    add("--p-drop-attr", type=drop_rate, default="uniform", help="probability of dropping each attribute, "
        "'uniform' (U(0, 1) per image) or 'balanced' (REPORT sec. 3.7)")
    add_run_flags(p)
    return p


def add_run_flags(p):
    """The flags of how a run trains, how fast, and what it writes."""
    pos, num, path, real = util.positive(int), util.non_negative, util.path, util.positive(float)
    add = p.add_argument_group("optimisation").add_argument
    add("--epochs", type=pos, default=100, help="passes over the training split")
    add("--max-steps", type=pos, help="stop after this many steps (not --epochs)")
    add("--minutes", type=util.positive(float, 525_600), help="fit the whole run into N minutes (a year at "
        "most)")
    add("--batch-size", type=pos, default=128, help="global batch, split over the GPUs")
    add("--lr", type=real, default=2e-4, help="peak AdamW learning rate")
    add("--warmup", type=num, default=5000, help="LR warm-up steps (at most a tenth of the run)")
    add("--lr-decay", default="constant", choices=["constant", "cosine"], help="after the warm-up")
    add("--weight-decay", type=util.between(0, math.inf), default=0.0, help="AdamW weight decay")
    add("--grad-clip", type=real, default=1.0, help="clip the gradient norm to this")
    add("--ema-decay", type=util.between(0, 1), default=0.9999, help="EMA decay d, as min(d, (1+s)/(10+s))")
    add("--seed", type=util.random_seed, help="random seed (default: drawn)")
    add = p.add_argument_group("speed").add_argument
    add("--device", help="cuda, mps or cpu (default: the first available)")
    add("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="autocast (auto: bf16 "
        "or fp16 on GPUs)")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    add("--channels-last", action=argparse.BooleanOptionalAction, help="channels_last memory format "
        "(default: off for an eager GPU step)")
    add("--grad-checkpoint", default="auto", choices=["auto", "on", "off"], help="recompute each block in "
        "backward (auto: when a batch needs it)")
    add = p.add_argument_group("logging, evaluation and checkpoints").add_argument
    add("--out", type=path, default="out", help="folder for ckpt.pt, grids and log.csv")
    add("--overwrite", action="store_true", help="replace the run in --out")
    add("--log-every", type=pos, default=100, help="a progress line every N steps")
    add("--sample-every", type=num, default=5000, help="a sample grid every N steps (0: never)")
    add("--sample-steps", type=pos, default=DEFAULT_STEPS, help=f"the grids' {DEFAULT_SAMPLER} steps")
    add("--sample-n", type=util.between(1, 1024, int), default=64, help="images in a grid")
    add("--eval-every", type=num, default=5000, help="a validation loss every N steps (0: never)")
    add("--eval-images", type=pos, default=1024, help="validation images")
    add("--ckpt-every", type=num, default=5000, help="write ckpt.pt every N steps (0: at the end)")
    add("--resume", nargs="?", const="latest", type=path, help="continue a run (default: ckpt.pt in --out)")
    add("--other-data", action="store_true", help="resume on other images than the run's")
    add("--dry-run", action="store_true", help="check a setup: 2 steps of one image, then a checkpoint")
    add = p.add_argument_group("benchmark").add_argument
    add("--bench", action="store_true", help="time training steps: img/s, MFU")
    add("--bench-steps", type=pos, default=20, help="timed steps for --bench")
    add("--peak-tflops", type=real, help="the device's peak TFLOP/s for MFU")


if __name__ == "__main__":
    main()
