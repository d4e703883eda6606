"""
The plumbing that the scripts share, so that no script imports another: one-line errors and argparse types;
writes that are all or nothing and the lock that keeps two runs out of one folder; the checkpoint file
(written atomically, loaded with weights_only and verified); the device and the ranks of a torchrun job;
messages that outlive a closed terminal, and progress lines with an ETA. It imports no module of the project,
never changes a model and decides nothing about how a step computes (that is budget.py's and train.py's).
"""
import argparse
import contextlib
import csv
import json
import math
import os
import signal
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
    """Bad input (`errors`) exits with its message, one line and code 2; Ctrl-C, SIGTERM and SIGHUP (which
    stop_on_signals turns into KeyboardInterrupt(signal)) with `interrupted` and code 128 + the signal."""
    try:
        yield
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        sig = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        print(f"{signal_name(sig)}: {interrupted}", file=sys.stderr)
        sys.exit(128 + sig)


def stop_on_signals(done=None):
    """Ctrl-C, SIGTERM (Slurm, `timeout`) and SIGHUP (a closed terminal) raise KeyboardInterrupt(signal),
    which one_line_errors ends in one line (and the `finally` clauses that clean up run). Once the work is
    `done` (the words that say so), they only say it: the process ends as it would have."""
    def stop(signum, frame):
        if done:
            with contextlib.suppress(OSError):
                print(f"{signal_name(signum)}: {done}", file=sys.stderr)
            return
        raise KeyboardInterrupt(signum)
    for s in STOPS:
        signal.signal(s, stop)

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


count = between(0, math.inf, int)  # an integer >= 0 (0 usually means never)


def random_seed(s):
    """A seed in 0..2^63-1: what torch's generators take, with room for the per-step offsets."""
    v = int(s)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2^63-1, got {s}")
    return v
random_seed.__name__ = "integer"


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
    folder = os.path.abspath(folder or ".")
    created = []
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


def meta_crc(ckpt):
    """CRC-32 of everything else a checkpoint holds (settings, configs, plan, scale factor, counters), as JSON
    with sorted keys: its use depends on these as much as on the weights."""
    meta = {k: v for k, v in ckpt.items() if k not in (*CHECKED, "rng", "checksums")}
    return zlib.crc32(json.dumps(meta, sort_keys=True, default=repr).encode())


def save_checkpoint(ckpt, path, what="--out"):
    checksums = {part: tensor_crc(ckpt[part]) for part in CHECKED if part in ckpt}
    ckpt = dict(ckpt, checksums=dict(checksums, meta=meta_crc(ckpt)))
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    atomic_write(write, path, what)


def load_checkpoint(path, parts=("model", "ema", "optimizer"), networks=None, say=None):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt, unsafe, foreign and damaged
    files: the tensors of `parts` (and of a latent model's autoencoder) must be there, be finite and match
    their checksums, and each model part must build from its config: networks[kind](ckpt, part), kind the
    network the part holds, "unet" or "autoencoder" (on the meta device, at no cost; it raises KeyError,
    RuntimeError, TypeError or ValueError where they do not fit). The other parts are verified too: where
    they fail, say() says once that the file cannot be resumed. A folder means its ckpt.pt."""
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
    check_meta(ckpt, path)
    for part in parts:
        check_part(ckpt, part, path)
    for part in ("model", "ema", "optimizer"):  # (a latent model's autoencoder is checked below)
        if part not in parts and part in ckpt and not checksum_ok(ckpt, part) and say:
            say(f"note: {path}: its {part} tensors fail their checksum (the file was damaged after it was "
                "written), so it cannot be resumed; the weights used here are intact")
    models = [p for p in ("model", "ema") if p in parts]
    if "autoencoder" in ckpt:  # a latent model's decoder: every use needs it
        check_part(ckpt, "autoencoder", path)
        models.append("autoencoder")
    for part in models if networks is not None else []:
        try:
            networks[network_of(ckpt, part)](ckpt, part)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its {part} weights do not fit the model its config describes in "
                                  f"this version ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    step = ckpt.get("step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{path}: its step {step!r} is not a count of steps; the file was edited or "
                              "damaged")
    return ckpt


def check_meta(ckpt, path):
    """What every use of a checkpoint depends on besides its weights: there, as written (the checksum of
    checkpoints that have one), and of a sense (a latent model's autoencoder and a finite, positive scale
    factor)."""
    damaged = "so the file was damaged or edited; use another copy or an earlier checkpoint"
    saved = ckpt.get("checksums", {}).get("meta")
    if saved is not None and meta_crc(ckpt) != saved:
        raise CheckpointError(f"{path}: its settings, configs or counters fail their checksum, {damaged}")
    for key in ("args", "model_args"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path} lacks its {key} entry, {damaged}")
    if (ckpt["args"].get("latents") or "autoencoder_args" in ckpt) and "autoencoder" not in ckpt:
        raise CheckpointError(f"{path} is a latent model without its autoencoder entry, {damaged}")
    if "autoencoder" in ckpt:
        scale = ckpt.get("autoencoder_args", {}).get("scale_factor")
        if not isinstance(scale, float) or not 0 < scale < math.inf:
            raise CheckpointError(f"{path}: its latents' scale factor {scale!r} is not a finite positive "
                                  f"number, {damaged}")


def network_of(ckpt, part):
    """Which network a part of a checkpoint holds: "autoencoder" (an autoencoder run's weights, or a latent
    run's first stage), "control" (a ControlNet run's base and control) or "unet"."""
    if part == "autoencoder" or ckpt["args"].get("autoencoder"):
        return "autoencoder"
    if ckpt["args"].get("control"):
        return "control"
    return "unet"


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
# signals: stop a run at a safe point, or cut a long phase short


SIGHUP = getattr(signal, "SIGHUP", 1)  # (not on Windows)
SIGPIPE = getattr(signal, "SIGPIPE", 13)
STOPS = [getattr(signal, s) for s in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, s)]  # (Windows)


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
        self.saved = {s: signal.getsignal(s) for s in STOPS}

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


# -----------------------------------------------------------------------------
# messages


def fmt_bytes(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plural(n, word, words=None):
    """'1 image', '2 images', '1,024 images' (`words`: the plural, where it is not word + 's')."""
    if n == 1:
        return f"1 {word}"
    return f"{n:,} {words or word + 's'}"


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Say:
    """print(), flushed, that outlives its terminal: once stdout fails (a closed terminal, SIGHUP, a closed
    pipe as in `| head`), stdout is sent to /dev/null, the lines go to the file `fallback()` names (or
    nowhere), and on_lost() is called once, so that the run can stop as it would on SIGTERM."""

    def __init__(self, fallback=lambda: None, on_lost=lambda: None):
        self.fallback = fallback
        self.on_lost = on_lost
        self.lost = False

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
        self.total = total
        self.what = what
        self.unit = unit
        self.say = say
        self.every = every
        self.t0 = time.time()
        self.last = -math.inf if first else self.t0  # when a line was last said; None once the end was
        self.end = last

    def __call__(self, done):
        """With last=False the end goes unsaid when nothing was said before it (a short phase)."""
        now = time.time()
        if self.last is None or (done < self.total and now - self.last < self.every):
            return
        if done >= self.total and not self.end and self.last == self.t0:
            return
        self.last = now
        if done >= self.total:
            self.last = None
        rate = done / max(now - self.t0, 1e-9)
        line = f"{self.what}: {done:,.0f}/{self.total:,} {self.unit}"
        if now - self.t0 > 2 or done >= self.total:  # a rate of the first moments would mislead
            line += f" | {rate:,.1f} {self.unit}/s"
            if done < self.total:
                line += f" | ETA {fmt_time((self.total - done) / rate)}"
        self.say(line)


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
        atomic_write(write, path, what)

    def __call__(self, **values):
        try:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([values.get(k, "") for k in self.columns])
        except OSError as e:
            raise WriteError(f"cannot write {self.path} ({why(e)}); free some space or pass "
                                  f"another {self.what}")
