"""
The planning of a run's time and memory: the device and the processes that share the work (agreeing on a
plan under torchrun), how a step computes on this machine (its precision, memory format and CPU threads),
whether a batch fits in the device's memory, how long a step takes and how many FLOPs it does, and the
--minutes plan that fits a whole run into a time budget. train.py calls each of these by its name; what a
step computes (the objective: a DDPM's loss, an autoencoder's) is passed in, so this file imports no script
and no model.

    precision, ctx = autocast(device, "auto")     # bf16 on GPUs that have it, fp32 on the CPU
    fits = plan_memory(model, probe, shape, ...)  # activation checkpointing only when the batch needs it
    minutes = Minutes(...); plan = minutes.timed(step, ...)   # --minutes: time the first steps, then plan
"""
import contextlib
import dataclasses
import importlib.util
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import util
from util import UsageError, fmt_bytes, fmt_time

MIN_STEPS = 1500  # --minutes narrows the preset until this many steps fit (REPORT sec. 3.5)
FACE_STEPS = 1000  # 1,037 steps made faces (REPORT sec. 3.5); a plan of fewer gets a warning
COMPILE_SECONDS = 90  # torch.compile's warm-up of the 64 px preset on an H200 (REPORT sec. 3.10)
ENCODE_SHARE = 0.15  # a latent run's one-time encoding takes at most this share of what is left of --minutes
# (a first run then trains at least 80% of the steps of one whose latents are cached)
THREADS_EVERY = 10  # seconds between two looks at the CPU's load (other programs come and go)
# dense bf16 tensor-core peak (TFLOP/s) by device name, for MFU; the first match wins
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250),
               ("A100", 312), ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165),
               ("RTX 3090", 71), ("V100", 125)]

# -----------------------------------------------------------------------------
# the device and the processes, and how a step computes on them: precision, memory format


def pick_device(name, local_rank=0, local_world=1, flag="--device"):
    """A device's name (the script's `flag`) -> torch.device (made current): the first available of cuda,
    mps, cpu when name is None. Under torchrun, process `local_rank` of the `local_world` on this machine
    takes GPU local_rank."""
    if name is None:
        name = "cpu"
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "mps", "cpu"):  # meta, xpu, ...: nothing trains there
        raise UsageError(f"{flag} {name}: not a device these scripts can run on; use cuda, cuda:N, mps or "
                         "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA GPU is visible; use {flag} cpu")
    want = max(local_world, (device.index or 0) + 1)
    n = torch.cuda.device_count()
    if device.type == "cuda" and want > n:
        raise UsageError(f"{want} processes want a GPU each but {n} GPU{'s are' if n > 1 else ' is'} "
                         f"visible; start torchrun with --nproc_per_node={n} (or fewer), or use {flag} cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS is not available here; use {flag} cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device, for kernels and NCCL
    return device


def synchronize(device):
    """Wait for the device's queued work, so that a timing measures it (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_memory(device):
    """Bytes a run may use on `device`: on a GPU what is free (other processes and MIG slices excluded) plus
    what this process holds, within its memory fraction; on the CPU what the OS has available."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)  # torch 2.7+
        return min(free + torch.cuda.memory_reserved(device), fraction * total)
    try:
        with open("/proc/meminfo") as f:  # Linux: MemAvailable counts reclaimable page cache
            return int(next(line for line in f if line.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def autocast(device, precision):
    """A precision (auto, bf16, fp16 or fp32) -> (its name, the autocast context). auto: bf16 on GPUs with
    native bf16 (Ampere and later), fp16 on older GPUs (is_bf16_supported() alone also counts the slow
    emulated bf16 of a V100 or T4), fp32 on CPU and MPS. fp32 means fp32: TF32 matmuls and convolutions only
    come with the mixed precisions."""
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        precision = "fp32"
        if device.type == "cuda":
            precision = "bf16" if native else "fp16"
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if dtype == torch.float32:
        return precision, contextlib.nullcontext()
    return precision, torch.autocast(device.type, dtype=dtype)


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


def step_settings(device, precision, compile=None, channels_last=None, dry_run=False):
    """How a training step computes on `device`: -> (precision's name, the autocast context, compiled or not,
    channels_last or not). None chooses: torch.compile on CUDA with Triton (not for a dry run); channels_last
    on the CPU or compiled, NCHW for an eager GPU step (GroupNorm converts channels_last back: NCHW measured
    faster, REPORT sec. 3.10)."""
    cuda = device.type == "cuda"
    name, ctx = autocast(device, precision)
    if compile is None:
        compile = cuda and importlib.util.find_spec("triton") is not None and not dry_run
    if channels_last is None:
        channels_last = not cuda or compile
    torch.backends.cudnn.benchmark = True
    return name, ctx, compile, channels_last


def to_channels_last(model):
    """Every 4-d weight in channels_last strides. Module.to(memory_format=) may keep a 1x1 kernel's NCHW
    strides (the same bytes), while its gradient comes back channels_last: DDP warns, and copies."""
    for p in model.parameters():
        if p.dim() == 4:
            o, i, h, w = p.shape
            p.data = torch.empty_strided(p.shape, (i * h * w, 1, w * i, i), device=p.device).copy_(p.data)


def match_gradient_strides(model, probe, shape, device):
    """Each weight in the strides its gradient comes back in, measured by one backward of a tiny input of
    `shape` through probe(model, x) (the per-image loss): DDP then copies no gradient into its buckets, and
    does not warn. A 1x1 kernel that a conv applies returns a channels_last gradient; one that attention
    applies as a matrix, an NCHW one."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x = torch.zeros(1, *shape, device=device)
        x = x.contiguous(memory_format=torch.channels_last)
        probe(model, x).sum().backward()
    for p in model.parameters():
        if p.grad is not None and p.grad.stride() != p.stride():
            p.data = torch.empty_strided(p.shape, p.grad.stride(), device=p.device).copy_(p.data)
    model.zero_grad(set_to_none=True)

# -----------------------------------------------------------------------------
# the CPU's threads


class CpuLoad:
    """How many cores other programs keep busy between two readings: the machine's busy time (/proc/stat) less
    this process's own (/proc/self/stat), so that it reads right while this process computes too. None where
    there is no /proc (not Linux)."""

    def __init__(self):
        self.last = self.read()

    @staticmethod
    def read():
        """-> (all ticks, idle ticks, this process's ticks), or None."""
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]  # "cpu": user nice system idle iowait ...
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
            return sum(v), v[3] + v[4], int(fields[11]) + int(fields[12])  # utime + stime of every thread
        except (OSError, ValueError, IndexError):
            return None

    def others(self):
        """Cores that other programs kept busy since the last call (or since this object was made)."""
        now = self.read()
        last = self.last
        self.last = now
        if now is None or last is None or now[0] <= last[0]:
            return None
        total, idle, own = (a - b for a, b in zip(now, last))
        cores = os.cpu_count() or 1
        return max(0.0, cores * (total - idle - own) / total)


def set_threads(device, processes=1, say=print, load=None):
    """On the CPU: one thread per core that no other program keeps busy, shared by this machine's `processes`.
    A thread that shares its core with another program stalls every parallel op (OpenMP waits for all its
    threads at each op's end): on 2 cores with one busy, 2 threads trained 6x slower than 1 (REPORT sec.
    3.10). OMP_NUM_THREADS, when set, decides instead. `load`: a CpuLoad running since the last call, for a
    re-check during a run, which says so when the count changes; without it the load is read over 0.25 s.
    -> the thread count."""
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        reading = CpuLoad()
        time.sleep(0.25)
        busy = reading.others() or 0.0
    else:
        busy = load.others() or 0.0
    # A core half busy counts as taken: a program that wants a whole core gets about two thirds of one while
    # this run's threads compete with it (on 2 cores, 2 threads and 1 busy loop: 3 threads share 2 cores).
    idle = max(1, cores - math.floor(busy + 0.5))
    n = max(1, idle // processes)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    if load is None and n * processes < cores:
        say(f"threads: {n} per process, {cores - idle} of {cores} cores being busy with other programs "
            "(OMP_NUM_THREADS=N chooses)")
    if load is not None and n != before:
        say(f"threads: {before} -> {n} per process, other programs now keeping {cores - idle} of {cores} "
            "cores busy (OMP_NUM_THREADS=N chooses)")
    return n


class Threads:
    """A run's CPU threads, chosen again every THREADS_EVERY seconds as other programs come and go (not where
    OMP_NUM_THREADS decides, nor off the CPU)."""

    def __init__(self, device, processes, say):
        self.device = device
        self.processes = processes
        self.say = say
        self.count = set_threads(device, processes, say)
        self.load = None
        if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            self.load = CpuLoad()
        self.t = time.time()

    def recheck(self, now):
        """Choose the threads again if THREADS_EVERY seconds have passed since the last choice."""
        if self.load is None or now - self.t < THREADS_EVERY:
            return
        self.count = set_threads(self.device, self.processes, self.say, self.load)
        self.t = now

# -----------------------------------------------------------------------------
# memory: what a model and a batch need, refused before anything is allocated


@contextlib.contextmanager
def memory_errors(what, fix):
    """Running out of memory during `what` becomes a one-line UsageError that says `fix`."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        raise UsageError(f"{what} does not fit the memory ({str(e).splitlines()[0][:80]}); {fix}")


def images(n):
    return util.plural(n, "image")


def check_fits(params, net, device, fix):
    """Refuse, before anything is allocated, a model of `params` parameters whose state and one image's
    activations (a lower bound: the input and the first level's maps) exceed the memory of `device`."""
    need = 20 * params + 4 * net.image_size ** 2 * (3 + net.ch * (2 * net.num_res_blocks + 2))
    available = device_memory(device) if device.type != "mps" else math.inf
    if need > available:
        raise UsageError(f"the model ({params / 1e6:,.1f}M parameters at {net.image_size}x{net.image_size}) "
                         f"needs at least {fmt_bytes(need)}, more than the {fmt_bytes(available)} available "
                         f"on {device.type}: {fix}")


def saved_bytes_per_image(model, probe, shape, checkpointing, device, ctx, fix):
    """Bytes that autograd keeps for backward per image of `shape` through probe(model, x), with activation
    checkpointing on or off: the slope between 1 and 2 inputs (the model's own setting is left as it was).
    Out of memory: a UsageError that says `fix`."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

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
        with memory_errors(f"{images(b)} of {shape}", fix), \
                ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            probe(model, x)
        return total

    was = model.grad_checkpoint
    model.grad_checkpoint = checkpointing
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return measure(2) - measure(1)
    finally:
        model.grad_checkpoint = was


def plan_memory(model, probe, shape, batch, world, ddp, mode, device, ctx, say, fix, resident_bytes=0):
    """Plan a training step's memory from the bytes autograd keeps for backward per image (the slope between
    the loss on 1 and 2 images); mode 'auto' turns activation checkpointing on only when `batch` (global,
    over `world` processes) needs it. A batch that cannot fit is refused with fix(fit), the words for a batch
    of `fit` that would (0: none). -> whether to checkpoint."""
    if device.type == "mps":  # unified memory, no figure to plan against
        return mode == "on"
    b = batch // world
    # besides the activations: weights, gradients, Adam's moments, EMA (and DDP's buckets), resident images
    state_bytes = (20 + 4 * ddp) * model.num_params() + resident_bytes
    available = device_memory(device)
    budget = 0.85 * available
    for on in ([False, True] if mode == "auto" else [mode == "on"]):
        # +25%: backward's temporaries
        per_image = 1.25 * saved_bytes_per_image(model, probe, shape, on, device, ctx, fix(0))
        need = state_bytes + b * per_image
        if need <= budget:
            say(f"memory: ~{fmt_bytes(need)} for a batch of {b} (of {fmt_bytes(available)} on "
                f"{device.type}); activation checkpointing {'on' if on else 'off'}")
            return on
    fit = max(0, int((budget - state_bytes) / per_image) * world)
    raise UsageError(f"a batch of {batch} needs ~{fmt_bytes(need)}, more than the {fmt_bytes(budget)} a run "
                     f"may use (85% of the {fmt_bytes(available)} available on {device.type}): {fix(fit)}")

# -----------------------------------------------------------------------------
# time: a step, a forward pass, the FLOPs


def time_step(build, probe, shape, batch, device, ctx, fix):
    """-> seconds of a training step of a fresh model, build(), at `batch` synthetic inputs of `shape` (the
    faster of two, after a warm-up), drawing none of the run's seeded randomness; out of memory: `fix`."""
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = build().to(device)
        x = torch.zeros(batch, *shape, device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=0.0)
        for _ in range(3):
            t0 = time.time()
            with memory_errors(f"a step of {images(batch)} of {shape}", fix), ctx:
                probe(model, x).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.time() - t0)
    return max(min(times[1:]), 1e-9)


@torch.no_grad()
def time_forward(forward, shape, batch, device, ctx):
    """Seconds per input of forward(x) at `batch` zero inputs of `shape` (the second of two): a grid's model
    evaluation, or an autoencoder's reconstruction."""
    x = torch.zeros(batch, *shape, device=device)
    for _ in range(2):
        t0 = time.time()
        with ctx:
            forward(x)
        synchronize(device)
    return (time.time() - t0) / batch


def count_flops(model, loss, ctx):
    """FLOPs of loss().backward() (torch.utils.flop_counter), without activation checkpointing's recompute."""
    checkpointing = model.grad_checkpoint
    model.grad_checkpoint = False
    with FlopCounterMode(display=False) as fc, ctx:
        loss().backward()
    model.grad_checkpoint = checkpointing
    return fc.get_total_flops()


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_tflops(device):
    if device.type != "cuda":
        return None
    return next((p for k, p in PEAK_TFLOPS if k in device_name(device)), None)


def bench(step, steps, flops, batch, world, device, peak=None, no_peak="MFU n/a"):
    """Time `steps` calls of step() (one training step of `batch` images per process) after a warm-up of 3.
    -> (the warm-up's seconds, a line of its img/s, ms/step, the host's time to issue one, peak memory,
    GFLOP/img and MFU): `flops` per step and process; `peak`: the device's TFLOP/s (default: PEAK_TFLOPS;
    unknown: `no_peak` is said)."""
    t0 = time.time()
    for _ in range(3):  # warm-up: compilation, cudnn autotuning
        step()
    synchronize(device)
    warmup = time.time() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for _ in range(steps):
        step()
    synchronize(device)
    dt = (time.time() - t0) / steps
    host = []
    for _ in range(3):  # the host's time to issue a step to an idle device: near dt, launches bound it
        t0 = time.time()
        step()
        host.append(time.time() - t0)
        synchronize(device)
    peak = peak or peak_tflops(device)
    tflops = flops / dt / 1e12
    mem = "n/a"
    if device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    bound = ""
    if min(host) > 0.8 * dt and device.type != "cpu":
        bound = ", launch-bound"
    mfu = no_peak
    if peak:
        mfu = f"MFU {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s"
    line = (f"{batch * world / dt:,.1f} img/s | {dt * 1e3:.1f} ms/step (host {min(host) * 1e3:.1f} ms to "
            f"issue one{bound}) | peak memory {mem} | {flops / batch / 1e9:.2f} GFLOP/img (fwd+bwd) | "
            f"{tflops:.2f} TFLOP/s/process | {mfu}")
    return warmup, line

# -----------------------------------------------------------------------------
# --minutes: fit the run into a time budget


@dataclass
class Plan:
    """The schedule (total: inf until a time budget's steps are timed); grids at grid_from + k * grid_every
    and at the end."""
    total: float
    warmup: int
    lr_decay: str
    ema_decay: float
    grid_every: int = 0
    grid_from: int = 0


def estimate_run(steps, batch, step_time, device, hint):
    """A new CPU or MPS run, before decoding: how long its `steps` of `batch` images take, a step's time
    extrapolated from those of 1 and 4 images, step_time(b) (a step has a cost of its own besides its images':
    1 image's time times the batch made a CPU estimate twice too long). Past a day, `hint` is said: what to
    run instead. -> the line to say."""
    one = step_time(1)
    few = min(batch, 4)
    per_step = one
    if few > 1:
        per_step += (step_time(few) - one) / (few - 1) * (batch - 1)
    line = (f"estimate: {steps:,} steps of {batch} images at ~{per_step:.1f} s each on this {device.type}: "
            f"about {fmt_time(steps * per_step)}")
    if steps * per_step > 86400:
        line += f"; far beyond a day here. {hint}"
    return line


def fit_width(minutes, widths, seconds_per_step, device, compiled):
    """A budget of `minutes` and a model of free width: the widest of `widths` ((channels, batch) pairs, from
    the preset's down to the narrowest, each half the one before) that leaves MIN_STEPS in the budget, but
    only among models faster per image (a small GPU step is bound by its launches); where none fits, the
    fastest per image. seconds_per_step(i) times candidate i. -> (its index, why it was chosen)."""
    budget = minutes * 60 - (COMPILE_SECONDS if compiled else 0)
    per_step = {}  # candidate -> seconds per step, from the smallest
    for i in reversed(range(len(widths))):
        if i + 1 in per_step and device.type != "cuda" and 8 * per_step[i + 1] * MIN_STEPS > budget:
            break  # on a CPU: a wider one, 8 times the work, cannot fit
        per_step[i] = seconds_per_step(i)
    per_image = {i: s / widths[i][1] for i, s in per_step.items()}
    faster = [i for i in sorted(per_step) if all(per_image[i] < per_image[j] for j in per_image if j < i)]
    fits = [i for i in faster if budget / per_step[i] >= MIN_STEPS]
    if fits:
        return fits[0], f"the widest that leaves >= {MIN_STEPS:,} steps"
    return min(faster, key=per_image.get), "the fastest per image"


class Minutes:
    """A time budget: the run ends within `minutes` of the process's start, imports, decoding, the last grid
    and checkpoint included. It times the steps after the first two (compilation, autotuning), then plans: the
    steps that fit, a warm-up of a tenth, the EMA over about the last tenth, grids evenly spaced; it moves the
    end when the speed changes by 5% and ends early rather than late. It prices what is not training from what
    it is told: a grid's and the validation's forward passes (`forward_s`, seconds per image and model
    evaluation), the last checkpoint's write (`save_s`). label(m) names a budget of m minutes in its messages,
    as the script's flag sets it."""

    def __init__(self, *, minutes, t_start, settings, params, steps_per_epoch, grid_evals, val_evals,
                 face_steps, time_forward, device, label, say, master=True, group=None):
        self.minutes = minutes
        self.t_start = t_start
        self.s = settings  # the run's settings: batch_size, lr_decay, warmup, ema_decay, sample_every, ...
        self.params = params  # of the model: the checkpoint's size
        self.steps_per_epoch = steps_per_epoch
        self.grid_evals = grid_evals  # model evaluations per grid image (a DDPM's sampler steps)
        self.val_evals = val_evals  # model evaluations of a validation loss (images x passes)
        self.face_steps = face_steps  # below this many steps a DDPM draws noise (None: no such limit)
        self.time_forward = time_forward  # () -> seconds of a grid's forward pass per image
        self.device = device
        self.label = label
        self.say = say
        self.master = master
        self.group = group  # torchrun: the group in which rank 0's plan is shared
        self.probe = None  # (step, time) where the timing began
        self.rate = 0.0  # steps per second, a running mean
        self.forward_s = None  # seconds of an EMA forward pass per image and evaluation, once timed
        self.save_s = 0.0  # seconds the last checkpoint took to write
        self.grids = 0  # grids drawn by this process
        self.last_grid = 0  # the step of the last one

    def grid_drawn(self, step, forward_s):
        """A grid was drawn at `step`, at `forward_s` seconds per image and model evaluation."""
        self.grids += 1
        self.last_grid = step
        self.forward_s = forward_s

    def time_left(self):
        return self.minutes * 60 - (time.time() - self.t_start)

    def timed(self, step, plan):
        """Called after each step until there is a plan: time the steps after the first two, and plan after 10
        steps and 10 s (2% of a short budget). -> the plan (the one given, while timing)."""
        synchronize(self.device)
        if self.probe is None:
            self.probe = (step + 2, None)
        if step == self.probe[0]:
            self.probe = (step, time.time())
        if self.probe[1] is None:
            return plan
        seconds = time.time() - self.probe[1]
        if step - self.probe[0] < 10 or seconds < min(10, 1.2 * self.minutes):
            return plan
        if self.master:
            self.forward_s = self.time_forward()
        self.rate = (step - self.probe[0]) / seconds
        return self.replan(step, plan, self.rate)

    def after_step(self, step, plan, stopping):
        """After each step: timed() until there is a plan; then, where only the end's share of the budget is
        left (on any rank, and not `stopping` anyway), the plan cut at this step. -> the plan."""
        if math.isinf(plan.total):
            plan = self.timed(step, plan)
        if on_any_rank(self.past_deadline(plan) and not stopping, self.group):
            plan = self.cut(plan, step)
        return plan

    def followed(self, step, plan, rate):
        """At a progress line, `rate` steps/s since the last one: the machine got slower or faster. The speed
        of one line's steps varies by 10% here, a running mean gives the last line 0.7. -> the plan, moved if
        the speed changed by over 5%."""
        if self.probe is None or math.isinf(plan.total) or step >= 0.95 * plan.total:
            return plan
        self.rate = 0.3 * self.rate + 0.7 * rate
        return self.replan(step, plan, self.rate)

    def replan(self, step, plan, rate):
        """The steps that fit the budget at `rate` steps/s, a warm-up of a tenth, the EMA over the last tenth,
        a grid each quarter (or now and three more; fewer where grids are dear); moved when the speed changes
        by 5%, the grids still to draw spread evenly over what is left. -> the new plan, or `plan`."""
        s = self.s
        per_step = self.seconds_per_step(rate)
        left = self.time_left() - self.grid_seconds() * self.grids_left() - self.last_seconds()
        total = int(from_rank0(step + max(1, int(0.98 * left / per_step)), self.group))  # rank 0's plan
        first = math.isinf(plan.total)
        if not first and abs(total - plan.total) <= 0.05 * plan.total:
            return plan
        if first:
            warmup = min(s.warmup, total // 10)
            start = 0
            grids = self.grids_planned()
            if grids > 1 and -(-total // grids) <= step:  # the first part is over: a grid now, the rest later
                start = step
                grids -= 1
        else:
            warmup = plan.warmup
            start = max(self.last_grid, plan.grid_from)  # from the last grid drawn
            grids = max(1, self.grids_planned() - self.grids)  # still to draw, the last at the end
            if grids > 1 and start + self.grids_every(total - start, grids) <= step:
                start = step  # the next one is overdue in the new plan: drawn now, the others over the rest
                grids -= 1
        every = self.grids_every(total - start, grids)
        new = Plan(total, warmup, s.lr_decay, min(s.ema_decay, 1 - 10 / total), every, start)
        now = "" if first else " now"
        self.say(f"{self.label(self.minutes)}: {rate * s.batch_size:,.1f} img/s{now}: {total:,} steps in "
                 f"all ({total / self.steps_per_epoch:.2f} epochs), lr warm-up {util.plural(warmup, 'step')} "
                 "then "
                 f"{s.lr_decay} decay, EMA decay {new.ema_decay:.5f}")
        if first and self.face_steps and total < self.face_steps and self.master:
            need = time.time() - self.t_start + (self.face_steps - step) * per_step + self.last_seconds()
            enough = self.label(math.ceil(need / 60))
            self.say(f"{self.label(self.minutes)}: {total:,} steps are too few for faces "
                     f"({self.face_steps:,} take about {enough} on this machine); the samples may be mostly "
                     "noise")
        return new

    def past_deadline(self, plan):
        """Whether only the end is left of the budget (a slower machine than planned ends the run early rather
        than late)."""
        used = time.time() - self.t_start
        return math.isfinite(plan.total) and used + self.last_seconds() >= self.minutes * 60

    def cut(self, plan, step):
        """The plan ended at `step`: the rest of the budget is the last grid's, evaluation's, checkpoint's."""
        return dataclasses.replace(plan, total=step, ema_decay=min(self.s.ema_decay, 1 - 10 / step))

    def grids_every(self, steps, grids=4):
        return grids_every(self.s.sample_every, steps, grids)

    def grids_planned(self):
        """Grids over the whole run: four (three on the way and the last), fewer where the three would take
        more than a tenth of the budget (a one-minute run on a laptop draws only the last)."""
        seconds = self.grid_seconds()
        if seconds <= 0:
            return 4
        return 1 + min(3, int(0.1 * self.minutes * 60 / seconds))

    def grids_left(self):
        """The planned grids not drawn yet, but the last: priced apart from the steps (the last one in
        last_seconds)."""
        if self.s.sample_every is not None:
            return 0
        return max(0, self.grids_planned() - 1 - self.grids)

    def grid_seconds(self):
        """One sample grid: sample_n images of grid_evals model evaluations."""
        if self.s.sample_every == 0:
            return 0.0
        return self.s.sample_n * self.grid_evals * (self.forward_s or 0.0)

    def seconds_per_step(self, rate):
        """A training step, with its share of the grids and validations due every sample_every and eval_every
        steps (a forward pass timed, or a third of a training step's share)."""
        fwd = self.forward_s or 1 / (3 * self.s.batch_size * rate)
        per_step = 1 / rate
        if self.s.sample_every:
            per_step += self.s.sample_n * self.grid_evals * fwd / self.s.sample_every
        if self.s.eval_every:
            per_step += self.val_evals * fwd / self.s.eval_every
        return per_step

    def last_seconds(self):
        """What the end of a run takes: the last grid, the validation loss and the checkpoint (timed, or
        priced at 200 MB/s for its weights, EMA and Adam's moments), with a margin of 20% and 3 s (the
        process's exit took about 1 s)."""
        val = self.val_evals * (self.forward_s or 0.0)
        save = self.save_s or 16 * self.params / 200e6 + 0.5
        return 1.2 * (self.grid_seconds() + val + save) + 3.0


def encoding_seconds(minutes, t_start):
    """The time a new latent run of `minutes` gives its one-time encoding: ENCODE_SHARE of what is left."""
    return ENCODE_SHARE * (minutes * 60 - (time.time() - t_start))


def schedule(total, warmup, lr_decay, ema_decay, sample_every, saved=None):
    """The Plan of a run of `total` steps (inf: a time budget's, until its steps are timed): the warm-up at
    most a tenth of it, a grid every `sample_every` steps (None: four over the run). A resumed run keeps its
    `saved` plan's warm-up and EMA decay."""
    grid_every = 0
    if sample_every is not None or math.isfinite(total):
        grid_every = grids_every(sample_every, total)
    if saved:
        return Plan(total, saved["warmup"], lr_decay, saved["ema_decay"], grid_every)
    if math.isfinite(total):
        warmup = min(warmup, total // 10)
    return Plan(total, warmup, lr_decay, ema_decay, grid_every)


def grids_every(sample_every, steps, grids=4):
    """A grid every `sample_every` steps, or where it is None (a time budget's grids) `steps` in `grids`
    parts, rounded up."""
    if sample_every is not None:
        return sample_every
    return -(-steps // grids)

