"""
The plumbing that the scripts share, so that no script imports another: one-line errors and argparse types;
writes that are all or nothing and the lock that keeps two runs out of one folder; the checkpoint file
(written atomically, loaded with weights_only and verified); the device, its precision and the CPU's threads;
messages that outlive a closed terminal, and progress lines with an ETA. It imports no module of the project
and never changes a model: what decides how a training step computes is in train.py.
"""
import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
import zlib

import torch
import torchvision
from PIL import Image

CKPT_FORMAT = "ddpm-faces-checkpoint-v1"  # the marker every checkpoint of this project carries


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
# files: all-or-nothing writes, the folder lock


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
    made = []
    d = folder
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


CHECKED = ("model", "ema", "optimizer", "autoencoder")  # the parts whose tensors carry a checksum


def save_checkpoint(ckpt, path, what="--out"):
    ckpt = dict(ckpt, checksums={part: tensor_crc(ckpt[part]) for part in CHECKED if part in ckpt})
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    atomic_write(write, path, what)


def load_checkpoint(path, parts=("model", "ema", "optimizer"), build=None, say=None):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt, unsafe, foreign and damaged
    files: the tensors of `parts` (and of a latent model's autoencoder) must be there, be finite and match
    their checksums, and build(ckpt, part), if given, must build each model part from its config (on the meta
    device: a check at no cost; it raises KeyError, RuntimeError, TypeError or ValueError where they do not
    fit). The other checked parts are verified too: where they fail, say() says once that the file cannot be
    resumed. A folder means its ckpt.pt."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "ckpt.pt")):
        raise CheckpointError(f"{path} is a folder without a ckpt.pt; pass the checkpoint file that train.py "
                              "wrote")
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {path} not found; pass the ckpt.pt that train.py wrote (in its "
                              "--out folder)")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a device, or a link that leads "
                              "nowhere or to itself); pass the ckpt.pt that train.py wrote")
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
    marker = ckpt.get("format") if isinstance(ckpt, dict) else None
    family = CKPT_FORMAT.rsplit("-", 1)[0]  # ddpm-faces-checkpoint
    if isinstance(marker, str) and marker.startswith(family + "-") and marker != CKPT_FORMAT:
        raise CheckpointError(f"{path} was written by another version of this project (its marker is "
                              f"'{marker}', this version reads '{CKPT_FORMAT}'); use that version, or "
                              "retrain")
    if marker != CKPT_FORMAT:
        raise CheckpointError(f"{path} was not written by this project's train.py (no '{CKPT_FORMAT}' "
                              "marker); pass a ckpt.pt from train.py's --out folder")
    for part in parts:
        check_part(ckpt, part, path)
    for part in CHECKED:
        if part not in parts and part in ckpt and not checksum_ok(ckpt, part) and say:
            say(f"note: {path}: its {part} tensors fail their checksum (the file was damaged after it was "
                "written), so it cannot be resumed; the weights used here are intact")
    if "autoencoder" in ckpt:  # a latent model's decoder: every use needs it
        check_part(ckpt, "autoencoder", path)
    models = [p for p in ("model", "ema") if p in parts]
    if "autoencoder" in ckpt:
        models.append("autoencoder")
    for part in models if build is not None else []:
        try:
            build(ckpt, part)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its {part} weights do not fit the model its config describes in "
                                  f"this version ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    step = ckpt.get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: its step {step!r} is not a count of steps; the file was edited or "
                              "damaged")
    return ckpt


def check_part(ckpt, part, path):
    """The tensors of one part of a checkpoint are there, finite and as they were written."""
    if not isinstance(ckpt.get(part), dict):
        raise CheckpointError(f"{path} lacks its {part} entry, so the file was damaged or edited; use "
                              "another copy or an earlier checkpoint")
    floats = [v for v in ckpt[part].values() if torch.is_tensor(v) and v.is_floating_point()]
    if part != "optimizer" and not all(torch.isfinite(v).all() for v in floats):
        raise CheckpointError(f"{path}: its {part} weights are not finite (NaN or inf), so every image would "
                              "be blank; the run diverged before this was saved: use an earlier checkpoint "
                              "or retrain")
    if not checksum_ok(ckpt, part):
        raise CheckpointError(f"{path}: its {part} tensors fail their checksum, so the file was damaged "
                              "after it was written (disk, copy or transfer); use another copy or an earlier "
                              "checkpoint")


def checksum_ok(ckpt, part):
    saved = ckpt.get("checksums", {}).get(part)  # checkpoints before checksums have none
    return saved is None or tensor_crc(ckpt[part]) == saved


# -----------------------------------------------------------------------------
# the device, its precision, and the CPU's threads


def pick_device(name, local_rank=0, local_world=1):
    """--device -> torch.device (made current): the first available of cuda, mps, cpu when name is None.
    Under torchrun, process `local_rank` of the `local_world` on this machine takes GPU local_rank."""
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
        raise UsageError(f"--device {name}: not a device these scripts can run on; use cuda, cuda:N, mps or "
                         "cpu")
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
        precision = "fp32"
        if device.type == "cuda":
            precision = "bf16" if native else "fp16"
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
        now, last = self.read(), self.last
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

