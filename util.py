"""
The plumbing of the scripts, so that no script imports another and none has to be read to learn diffusion:
the errors printed as one line and the argparse types; writes that are all or nothing, the lock that keeps
two runs out of one folder, the CSV log; the checkpoint file; the device, its precision and CPU threads;
signals; the memory, time and FLOPs of a training step; the agreement of torchrun's ranks; messages that
survive a closed terminal and progress lines with an ETA; labelled picture grids and line charts.
"""
import argparse
import contextlib
import csv
import math
import os
import signal
import sys
import tempfile
import time
import zlib

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms.v2 import functional as TF

import unet
from diffusion import GaussianDiffusion

CKPT_FORMAT = "ddpm-faces-checkpoint-v1"


class UsageError(Exception):
    """A bad flag, or flags that do not go together: the message names it and the fix."""


class WriteError(Exception):
    """A file could not be written (disk full, read-only, quota): the message names the file and the fix."""


class CheckpointError(Exception):
    """A missing, corrupt, unsafe or foreign checkpoint, or one whose parts do not fit together."""

@contextlib.contextmanager
def one_line_errors(errors, interrupted="interrupted"):
    """Bad input (`errors`) exits with its message, one line and code 2; Ctrl-C with `interrupted` and 130."""
    try:
        yield
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)

# -----------------------------------------------------------------------------
# the command line: argparse types (argparse names a bad value by the type's __name__) and the parser


def real(s):
    """A finite float (float() alone also takes 'nan' and 'inf')."""
    v = float(s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return v
real.__name__ = "number"


def positive(kind, most=math.inf):
    """A finite number > 0 of `kind` (int or float), at most `most`."""
    def parse(s):
        v = real(s) if kind is float else kind(s)
        if not 0 < v <= most:
            bound = "be > 0" if v <= 0 else f"be at most {most:,}"
            raise argparse.ArgumentTypeError(f"must {bound}, got {s}")
        return v
    parse.__name__ = "positive integer" if kind is int else "positive number"
    return parse


def non_negative(s):
    """An integer >= 0 (0 usually means never)."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v
non_negative.__name__ = "integer"


def between(lo, hi, kind=float):
    """A finite number of `kind` (int or float) in [lo, hi] (hi may be inf)."""
    def parse(s):
        v = real(s) if kind is float else kind(s)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {s}" if hi < math.inf else
                                             f"must be >= {lo:g}, got {s}")
        return v
    parse.__name__ = "number" if kind is float else "integer"
    return parse


def random_seed(s):
    """A seed in 0..2^63-1: what torch's generators take, with room for the per-step offsets."""
    v = int(s)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2^63-1, got {s}")
    return v
random_seed.__name__ = "integer"


def int_list(s):
    """Comma-separated positive integers, e.g. 1,2,2,2."""
    parts = s.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError("expected comma-separated positive integers such as 1,2,2,2, got "
                                         f"{s!r}")
    return tuple(int(p) for p in parts)


def path(s):
    """A file or folder name; an empty one would silently mean the working directory."""
    if not s.strip():
        raise argparse.ArgumentTypeError("is empty; give a file or folder name")
    return os.path.expanduser(s)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' once, and not at all where the default is None or False (the help says it)."""
    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage is what -h prints)."""
    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        if "expected one argument" in message:  # --ch-mult -1,2: argparse takes '-1,2' for a flag
            message += " (a value that starts with '-' is written --flag=VALUE)"
        self.exit(2, f"error: {message} (python {self.prog} -h lists the flags)\n")

    def parse(self, argv=None):
        """-> (args, the set of flags typed on the command line)."""
        args = self.parse_args(argv)
        defaults = {a.dest: a.default for a in self._actions}
        for a in self._actions:  # parse again with no defaults: what is left was typed
            a.default = argparse.SUPPRESS
        try:
            return args, set(vars(self.parse_args(argv)))
        finally:
            for a in self._actions:
                a.default = defaults[a.dest]

# -----------------------------------------------------------------------------
# files: all-or-nothing writes, the folder lock, the CSV log


def why(e):
    """A short reason for a failed write: the OS's words when there are some."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return "the write failed part-way: disk full or over quota?"


def check_writable(folder, what):
    """Write a scratch file in `folder`, so that a bad output path fails before any work (folders made for
    that are removed again), and remove_stale_temporaries there. -> how many it removed."""
    folder, created = os.path.abspath(folder or "."), []
    try:
        parent = folder
        while not os.path.exists(parent):
            created.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise WriteError(f"{what} {folder}: cannot write there ({why(e)}); pass a writable folder")
    finally:
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                os.rmdir(d)
    return remove_stale_temporaries(folder)


def atomic_write(write, path, what):
    """write(tmp_path), then rename over `path`: a failure at any point leaves `path` as it was and no
    temporary file behind, and raises WriteError naming the file and `what` to change (a flag, a folder)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WriteError(f"cannot write {path} ({why(e)}); free some space or pass another {what}")


def write_png(img, path, what):
    """(3, H, W) uint8 -> a PNG file, atomically. torchvision's write_png does not report a full disk (it
    leaves an empty file), so the encoded bytes are written here, where Python raises on a short write."""
    data = torchvision.io.encode_png(img).numpy().tobytes()
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(write, path, what)


def save_image(x, path, what, **grid):
    """(N, 3, H, W) uint8 -> one grid image in the format of `path`'s extension, atomically."""
    # the temporary name has no extension
    fmt = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    atomic_write(lambda tmp: torchvision.utils.save_image(x.float() / 255, tmp, format=fmt, **grid), path,
                 what)


def image_formats():
    """File extensions Pillow can write, e.g. {'.png', '.jpg', ...}."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def remove_stale_temporaries(folder):
    """Delete the temporary files (NAME.tmpPID) that atomic_write left in `folder` when its process was
    killed mid-write: those whose process is gone. -> how many were removed."""
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        stem, _, pid = name.rpartition(".tmp")
        if not stem or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)  # raises if no such process
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed += 1
        except OSError:  # a live process of another user
            pass
    return removed


def claim_folder(folder, what):
    """lock_folder, made first where missing. -> (the lock, the folders made, innermost first)."""
    made, d = [], folder
    while not os.path.exists(d):
        made.append(d)
        d = os.path.dirname(d)
    return lock_folder(folder, what), made


def release_folder(lock, made):
    """Drop a claim: the lock file goes while still held (a run that starts now finds no lock, or a free
    one), and the folders that the claim made go if they are empty (a failed start leaves nothing)."""
    if lock:
        os.remove(lock.name)
        lock.close()
    for d in made:
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)


def lock_folder(folder, what):
    """Hold `folder` for this process: an exclusive flock on folder/.lock, which the OS drops when the process
    ends in any way (kill -9 included), so a killed run never leaves it stuck. -> the open lock file (keep it
    open; None where there is no flock). UsageError when another process holds the folder."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UsageError(f"{what} {folder} is in use by another run (process {pid}); wait for it to end, or "
                         f"pass another {what}")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class CsvLog:
    """A CSV file of `columns`, a row per call. From a run at step `resumed`, the rows of steps up to it are
    kept (the first column is the step); the rest go, so that each step appears once."""

    def __init__(self, path, columns, resumed, what):
        self.path, self.columns, self.what, rows = path, columns, what, []
        if resumed is not None and os.path.exists(path):
            with open(path, newline="") as f:
                rows = [r[:len(columns)] for r in csv.reader(f)
                        if r and r[0].isdigit() and int(r[0]) <= resumed]
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows([columns] + rows)
        atomic_write(write, path, what)

    def __call__(self, **values):
        try:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([values.get(k, "") for k in self.columns])
        except OSError as e:
            raise WriteError(f"cannot write {self.path} ({why(e)}); free some space or pass another "
                             f"{self.what}")

# -----------------------------------------------------------------------------
# checkpoints: one self-describing file, written atomically, loaded with weights_only and verified


def tensor_crc(obj, crc=0):
    """CRC-32 of the bytes of every tensor in `obj` (nested dicts and lists, in key order)."""
    if torch.is_tensor(obj):
        return zlib.crc32(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            crc = tensor_crc(obj[k], crc)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            crc = tensor_crc(v, crc)
    return crc


CHECKED = ("model", "ema", "optimizer")  # the parts whose tensors carry a checksum


def save_checkpoint(ckpt, path, what="--out"):
    ckpt = dict(ckpt, checksums={part: tensor_crc(ckpt[part]) for part in CHECKED if part in ckpt})
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    atomic_write(write, path, what)


def load_checkpoint(path, parts=CHECKED):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt, unsafe, foreign and damaged
    files: the tensors of `parts` must be finite, match their checksums and (weights) the model's config. A
    folder means its ckpt.pt."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "ckpt.pt")):
        raise CheckpointError(f"{path} is a folder without a ckpt.pt; pass the checkpoint file that train.py "
                              "wrote")
    path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; pass the ckpt.pt that train.py wrote (in its "
                              "--out folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "GLOBAL" in str(e):  # weights_only met a reference to Python code: loading it could run that code
            name = str(e).split("GLOBAL ")[-1].split()[0]
            raise CheckpointError(f"{path} was refused as unsafe: it refers to Python objects ({name}) that "
                                  "could run code when loaded, which no checkpoint of this project holds; "
                                  "use a train.py ckpt.pt")
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated? "
                              f"{type(e).__name__}); use another checkpoint or retrain")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} was not written by this project's train.py (no '{CKPT_FORMAT}' "
                              "marker); pass a ckpt.pt from train.py's --out folder")
    for part in parts:
        if part != "optimizer" and not all(torch.isfinite(v).all() for v in ckpt.get(part, {}).values()
                                           if torch.is_tensor(v) and v.is_floating_point()):
            raise CheckpointError(f"{path}: its {part} weights are not finite (NaN or inf), so every image "
                                  "would be blank; the run diverged before this was saved: use an earlier "
                                  "checkpoint or retrain")
        saved = ckpt.get("checksums", {}).get(part)  # checkpoints before checksums have none
        if saved is not None and part in ckpt and tensor_crc(ckpt[part]) != saved:
            raise CheckpointError(f"{path}: its {part} tensors fail their checksum, so the file was damaged "
                                  "after it was written (disk, copy or transfer); use another copy or an "
                                  "earlier checkpoint")
    for part in set(parts) & {"model", "ema"}:  # config and weights fit together (on the meta device)
        model_from_checkpoint(ckpt, path, part, device="meta")
    step = ckpt.get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: its step {step!r} is not a count of steps; the file was edited or "
                              "damaged")
    return ckpt


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


def diffusion_from_checkpoint(ckpt):
    a = ckpt["args"]
    return GaussianDiffusion(a["timesteps"], a["schedule"], a["objective"], a.get("min_snr_gamma"))


def model_from_checkpoint(ckpt, path, weights="ema", device="cpu"):
    """-> (the U-Net with the checkpoint's `weights`, GaussianDiffusion), as the checkpoint describes them.
    On the meta device: a check, at no cost, that the config and the weights fit together."""
    try:
        return unet.from_checkpoint(ckpt, weights, device), diffusion_from_checkpoint(ckpt)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match this version of unet.py ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})")

# -----------------------------------------------------------------------------
# the device, its precision, and the CPU's threads


def pick_device(name, local_rank=0, local_world=1):
    """--device -> torch.device (made current): the first available of cuda, mps, cpu when name is None.
    Under torchrun, process `local_rank` of the `local_world` on this machine takes GPU local_rank."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use cuda, cuda:N, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    want, n = max(local_world, (device.index or 0) + 1), torch.cuda.device_count()
    if device.type == "cuda" and want > n:
        raise UsageError(f"{want} processes want a GPU each but {n} GPU{'s are' if n > 1 else ' is'} "
                         f"visible; start torchrun with --nproc_per_node={n} (or fewer), or use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device, for kernels and NCCL
    return device


def autocast(device, precision):
    """--precision -> (its name, the autocast context). auto: bf16 on GPUs with native bf16 (Ampere and
    later), fp16 on older GPUs (is_bf16_supported() alone also counts the slow emulated bf16 of a V100 or T4),
    fp32 on CPU and MPS. fp32 means fp32: TF32 matmuls and convolutions only come with the mixed
    precisions."""
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        precision = "fp32" if device.type != "cuda" else "bf16" if native else "fp16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    if dtype == torch.float32:
        return precision, contextlib.nullcontext()
    return precision, torch.autocast(device.type, dtype=dtype)


def synchronize(device):
    """Wait for the device's queued work, so that a timing measures it (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


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


def busy_cores(seconds=0.25):
    """How many cores other programs keep busy, from /proc/stat over `seconds` (this process is idle then).
    None where there is no /proc/stat."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all ticks, idle + iowait ticks
    try:
        total0, idle0 = read()
        time.sleep(seconds)
        total1, idle1 = read()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def set_threads(device, processes=1, say=print):
    """On the CPU: one thread per core that no other program keeps busy, shared by this machine's `processes`.
    A thread that shares its core with another program stalls every parallel op (OpenMP waits for all its
    threads at each op's end): on 2 cores with one busy, 2 threads trained 6x slower than 1 (REPORT sec.
    3.10). OMP_NUM_THREADS, when set, decides instead. -> the thread count."""
    if device.type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = busy_cores() or 0.0
    idle = max(1, cores - math.floor(busy + 0.3))  # a core 70% busy counts as taken
    n = max(1, idle // processes)
    torch.set_num_threads(n)
    if n * processes < cores:
        say(f"threads: {n} per process, {cores - idle} of {cores} cores being busy with other programs "
            "(OMP_NUM_THREADS=N chooses)")
    return n

# -----------------------------------------------------------------------------
# signals: stop at a safe point, or cut a long phase short


SIGHUP, SIGPIPE = getattr(signal, "SIGHUP", 1), getattr(signal, "SIGPIPE", 13)  # (not on Windows)


def signal_name(sig):
    """SIGINT, SIGTERM; SIGHUP and SIGPIPE with what sent them."""
    said = {SIGHUP: "SIGHUP (the terminal closed)", SIGPIPE: "SIGPIPE (stdout closed)"}
    return said.get(sig) or signal.Signals(sig).name


class Interrupted(Exception):
    """A signal arrived in a long phase (a CPU step, a sample grid, an evaluation): it is cut short."""


class StopSignals:
    """For the time it is entered: Ctrl-C, SIGTERM (Slurm, Kubernetes, `timeout`) and SIGHUP (a closed
    terminal) are appended to `signals`, for the loop to stop at a safe point; the first is acknowledged at
    once. A second Ctrl-C then quits at once; a second SIGTERM is ignored (Slurm signals every process and
    torchrun forwards it again: neither may cut the last checkpoint short). Once one has arrived, each of
    `models` raises Interrupted: every block before its forward, every weight after its gradient."""

    def __init__(self, signals, say, models=(), at_once=False):
        self.signals, self.say, self.when = signals, say, "now" if at_once else "after this step"
        kinds = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]  # Windows
        self.saved = {s: signal.getsignal(s) for s in kinds}
        def check(*_):
            if signals:
                raise Interrupted
        for model in models:
            for block in [*model.down, *model.mid, *model.up]:
                block.register_forward_pre_hook(check)
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(check)

    def handler(self, signum, frame):
        if not self.signals:
            self.say(f"\n{signal.Signals(signum).name}: stopping {self.when} and writing a checkpoint; press "
                     "Ctrl-C again to quit at once without one")
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.signals.append(signum)

    def __enter__(self):
        for s in self.saved:
            signal.signal(s, self.handler)

    def __exit__(self, *exc):
        for s, h in self.saved.items():
            signal.signal(s, h)

# -----------------------------------------------------------------------------
# a training step: its memory, time and FLOPs


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


@contextlib.contextmanager
def memory_errors(what, fix):
    """Running out of memory during `what` becomes a one-line UsageError that says `fix`."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "memory" not in str(e).lower():
            raise
        raise UsageError(f"{what} does not fit the memory ({str(e).splitlines()[0][:80]}); {fix}")


def plan_memory(model, loss, x, batch, processes, mode, ctx, say, state_bytes):
    """Plan a training step's memory from the bytes autograd keeps for backward per image (the slope between
    loss(x) on 1 and 2 images like x); mode "auto" turns the model's activation checkpointing on only when
    the batch needs it. A batch that cannot fit is refused, naming one that can. state_bytes: what lives on
    the device besides (weights, gradients, Adam moments, EMA, DDP's buckets, resident images)."""
    b, device = batch // processes, x.device
    if device.type == "mps":  # unified memory, no figure to plan against
        model.grad_checkpoint = mode == "on"
        return
    available = device_memory(device)
    budget = 0.85 * available
    for on in ([False, True] if mode == "auto" else [mode == "on"]):
        model.grad_checkpoint = on
        per_image = 1.25 * saved_bytes_per_image(model, loss, x, ctx)  # +25%: backward's temporaries
        need = state_bytes + b * per_image
        if need <= budget:
            return say(f"memory: ~{fmt_bytes(need)} for a batch of {b} (of {fmt_bytes(available)} on "
                       f"{device.type}); activation checkpointing {'on' if on else 'off'}")
    fit = int((budget - state_bytes) / per_image) * processes
    hint = f"use --batch-size {fit} or less" if fit >= processes else "use a smaller model (--ch)"
    hint += ", or --grad-checkpoint auto" if mode == "off" else ""
    raise UsageError(f"a batch of {batch} needs ~{fmt_bytes(need)}, more than the {fmt_bytes(budget)} a run "
                     f"may use (85% of the {fmt_bytes(available)} available on {device.type}): {hint}")


def saved_bytes_per_image(model, loss, x, ctx):
    """Bytes that autograd keeps for backward per image: the slope between loss() on 1 and 2 images."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    def measure(b):
        seen, total = set(params), [0]
        def pack(t):
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total[0] += t.untyped_storage().nbytes()
            return t
        xb = torch.randn((b, *x.shape[1:]), device=x.device)
        what = f"{b} image{'s' * (b > 1)} of {tuple(x.shape[1:])}"
        with memory_errors(what, "use a smaller --size or --ch"), \
                ctx, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(xb)
        return total[0]
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        return measure(2) - measure(1)


def check_fits(net, device, fix):
    """Refuse, before anything is allocated, a model (unet.Config) whose state and one image's activations (a
    lower bound: the input and the first level's maps) exceed the memory of `device`."""
    with torch.device("meta"):  # shapes only: no memory, no time
        params = unet.UNet(net).num_params()
    need = 20 * params + 4 * net.image_size ** 2 * (3 + net.ch * (2 * net.num_res_blocks + 2))
    available = device_memory(device) if device.type != "mps" else math.inf
    if need > available:
        raise UsageError(f"the model ({params / 1e6:,.1f}M parameters at {net.image_size}x{net.image_size}) "
                         f"needs at least {fmt_bytes(need)}, more than the {fmt_bytes(available)} available "
                         f"on {device.type}: {fix}")


def time_step(net, batch, device, ctx, fix):
    """-> seconds of a training step of a fresh model `net` at `batch` synthetic images (the faster of two,
    after a warm-up), drawing none of the run's seeded randomness; out of memory: `fix`."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model, size, times = unet.UNet(net).to(device), net.image_size, []
        x0 = torch.zeros(batch, 3, size, size, device=device)
        t = torch.zeros(batch, dtype=torch.long, device=device)
        opt, diffusion = torch.optim.AdamW(model.parameters(), lr=0.0), GaussianDiffusion(2).to(device)
        for _ in range(3):
            t0 = time.time()
            with memory_errors(f"a step of {batch} image{'s' * (batch > 1)} at {size}x{size}", fix), ctx:
                diffusion.training_losses(model, x0, t, x0).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.time() - t0)
    return max(min(times[1:]), 1e-9)


@torch.no_grad()
def time_forward(model, batch, size, device, ctx):
    """Seconds per image of a forward pass of `model` at `batch` images of `size` (the second of two)."""
    x = torch.zeros(batch, 3, size, size, device=device)
    for _ in range(2):
        t0 = time.time()
        with ctx:
            model(x, torch.zeros(batch, dtype=torch.long, device=device))
        synchronize(device)
    return (time.time() - t0) / batch


def count_flops(model, loss, ctx):
    """FLOPs of loss().backward() (torch.utils.flop_counter), without activation checkpointing's recompute."""
    checkpointing, model.grad_checkpoint = model.grad_checkpoint, False
    with FlopCounterMode(display=False) as fc, ctx:
        loss().backward()
    model.grad_checkpoint = checkpointing
    return fc.get_total_flops()


def to_channels_last(model):
    """Every 4-d weight in channels_last strides. Module.to(memory_format=) may keep a 1x1 kernel's NCHW
    strides (the same bytes), while its gradient comes back channels_last: DDP warns, and copies."""
    for p in model.parameters():
        if p.dim() == 4:
            o, i, h, w = p.shape
            p.data = torch.empty_strided(p.shape, (i * h * w, 1, w * i, i), device=p.device).copy_(p.data)

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
# messages


def fmt_bytes(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"



def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Say:
    """print(), flushed, that outlives its terminal: once stdout fails (a closed terminal, SIGHUP, a closed
    pipe as in `| head`), stdout is sent to /dev/null, the lines go to the file `fallback()` names (or
    nowhere), and on_lost() is called once, so that the run can stop as it would on SIGTERM."""

    def __init__(self, fallback=lambda: None, on_lost=lambda: None):
        self.fallback, self.on_lost, self.lost = fallback, on_lost, False

    def __call__(self, *args, **kw):
        if not self.lost:
            try:
                print(*args, **{**kw, "flush": True})
                return
            except OSError:  # BrokenPipeError (SIGPIPE is ignored by Python), or EIO from a hung-up terminal
                self.lost = True
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit either
                self.on_lost()
        name = self.fallback()
        if name:
            with contextlib.suppress(OSError), open(name, "a") as f:
                print(*args, **{k: v for k, v in kw.items() if k == "sep"}, file=f)


class Progress:
    """Progress lines for a long phase: `done` of `total` `unit`s, with the rate and the ETA once a few
    seconds have passed, every `every` seconds and at the end; with `first` also at the first call (work has
    begun)."""

    def __init__(self, total, what, unit, say=print, every=10.0, first=False, last=True):
        self.total, self.what, self.unit, self.say, self.every = total, what, unit, say, every
        self.t0 = time.time()
        self.last, self.end = -math.inf if first else self.t0, last

    def __call__(self, done):
        """With last=False the end goes unsaid when nothing was said before it (a short phase)."""
        now = time.time()
        if self.last is None or (done < self.total and now - self.last < self.every):
            return
        if done >= self.total and not self.end and self.last == self.t0:
            return
        self.last, rate = (now if done < self.total else None), done / max(now - self.t0, 1e-9)
        line = f"{self.what}: {done:,.0f}/{self.total:,} {self.unit}"
        if now - self.t0 > 2 or done >= self.total:  # a rate of the first moments would mislead
            line += f" | {rate:,.1f} {self.unit}/s" + (f" | ETA {fmt_time((self.total - done) / rate)}"
                                                       if done < self.total else "")
        self.say(line)

# -----------------------------------------------------------------------------
# pictures: a labelled grid of images, a line chart (Pillow draws the few charts)


def image_grid(rows, col_labels, row_labels, scale):
    """rows: list of (k, 3, H, W) uint8 -> a PIL image, the images enlarged `scale` times (nearest),
    labelled."""
    # (3, h, w)
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=255)
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
