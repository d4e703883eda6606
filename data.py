"""
CelebA loading: find the layout, choose the split, crop and resize every image once into a uint8 tensor
cache, then serve random batches from memory (on the GPU when it fits). Also the crop itself, which
sample.py applies to an image it edits, and [-1, 1] <-> uint8.

Layouts accepted as the data folder PATH:
  torchvision  PATH/celeba/img_align_celeba/*.jpg + list_eval_partition.txt, list_attr_celeba.txt
               (PATH may also be the celeba folder itself)
  kaggle       PATH/img_align_celeba/img_align_celeba/*.jpg + list_eval_partition.csv, list_attr_celeba.csv
  folder       any folder of .jpg/.jpeg/.png/.webp images, searched recursively, no labels

    python data.py --data ~/data/celeba --size 64                    # summary, cache, preview grid
    python data.py --data ~/data/celeba --size 64 --export fid_ref   # PNGs for FID reference statistics
"""
import concurrent.futures
import csv
import hashlib
import importlib.util
import multiprocessing
import os
import signal
import sys
import time
import warnings

import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

import util

IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CROPS = ("auto", "celeba", "center", "none")
# The crop of the DDIM CelebA-64 reference: a 128x128 box centred at (x=89, y=121) of the 178x218 image.
CELEBA_W, CELEBA_H, CELEBA_CX, CELEBA_CY, CELEBA_SIDE = 178, 218, 89, 121, 128
# torchvision 0.29 deprecates its codecs; they work
warnings.filterwarnings("ignore", message=".*TorchCodec.*")
SPLITS = {"train": 0, "valid": 1, "test": 2}
CACHE_VERSION = 2  # 2: a CRC-32 of the image bytes, verified on load
MAX_WARNINGS = 10


class DataError(Exception):
    """Bad data (a missing folder, no images, annotation files that do not fit): the message names the
    problem and the fix, and is printed as one line."""


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ddpm-faces")

# -----------------------------------------------------------------------------
# layout detection and annotation files


def _read_table(path):
    """list_*.txt or list_*.csv -> (column names or None, {image name: (lineno, raw values)}). Values stay
    text until `_ints` parses the rows actually used (202,599 rows take seconds to parse)."""
    rows = {}
    with open(path, newline="") as f:
        if path.endswith(".csv"):
            reader = csv.reader(f)
            header = next(reader, [])[1:]
            lines = ((i + 2, r[0], r[1:]) for i, r in enumerate(reader) if r)
        else:  # official txt: the attribute file starts with a count line and a names line
            lines = [(i + 1, *(line.split(None, 1) + [""])[:2]) for i, line in enumerate(f) if line.strip()]
            header = None
            if lines and lines[0][1].isdigit() and not lines[0][2].strip():
                header, lines = [lines[1][1]] + lines[1][2].split(), lines[2:]
        for lineno, name, raw in lines:
            rows[name] = (lineno, raw)
    return header, rows


def _ints(path, row):
    lineno, raw = row
    try:
        return [int(v) for v in (raw.split() if isinstance(raw, str) else raw)]
    except ValueError:
        raise DataError(f"{path} line {lineno}: expected an image name and integers; is it an official "
                        "CelebA annotation file?")


def find_layout(path):
    """-> dict(layout, image_dir, partition file or None, attr file or None)."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataError(f"data folder {path}: no such folder; give your CelebA folder (README, 'Getting "
                        "CelebA')")
    if not os.path.isdir(path):
        raise DataError(f"data folder {path}: is a file; give a folder (the CelebA root or a folder of "
                        "images)")
    def first(*names):
        return next((n for n in names if os.path.isfile(n)), None)
    for root in (os.path.join(path, "celeba"), path):  # torchvision
        part = first(os.path.join(root, "list_eval_partition.txt"))
        attr = first(os.path.join(root, "list_attr_celeba.txt"))
        if os.path.isdir(os.path.join(root, "img_align_celeba")) and (part or attr):
            image_dir = os.path.join(root, "img_align_celeba")
            return dict(layout="torchvision", image_dir=image_dir, partition=part, attr=attr)
    part = first(os.path.join(path, "list_eval_partition.csv"))
    attr = first(os.path.join(path, "list_attr_celeba.csv"))
    inner = os.path.join(path, "img_align_celeba")
    for image_dir in (os.path.join(inner, "img_align_celeba"), inner):
        if os.path.isdir(image_dir) and (part or attr):  # kaggle
            return dict(layout="kaggle", image_dir=image_dir, partition=part, attr=attr)
    return dict(layout="folder", image_dir=path, partition=None, attr=None)


def list_images(image_dir):
    files = []
    for dirpath, dirnames, filenames in os.walk(image_dir, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMG_EXTS) and not f.startswith(".")]
    return files


def select(path, split="train", log=print):
    """Find the images of one split. -> dict(layout, files, attrs (N, 40) uint8 0/1 or None, attr_names,
    ...)."""
    info = find_layout(path)
    on_disk = list_images(info["image_dir"])
    if not on_disk:
        raise DataError(f"data folder {info['image_dir']}: no images found (looked for {', '.join(IMG_EXTS)} "
                        "recursively); give the folder that holds img_align_celeba, or your images")
    by_name = {os.path.basename(f): f for f in on_disk}
    attr_names, attrs = None, None
    if info["partition"] or info["attr"]:
        _, partition = _read_table(info["partition"]) if info["partition"] else (None, None)
        attr_names, attr_rows = _read_table(info["attr"]) if info["attr"] else (None, None)
        listed = list(partition or attr_rows)
        found = [n for n in listed if n in by_name]
        if not found:
            raise DataError(f"{info['partition'] or info['attr']} lists {len(listed):,} images but none of "
                            f"the {len(on_disk):,} images in {info['image_dir']}; the annotation files do "
                            "not belong to these images: use matching files or remove them to load a plain "
                            "folder")
        if len(found) < len(listed):
            log(f"data: {len(found):,} of {len(listed):,} listed images found")
        if partition is not None and split != "all":
            found = [n for n in found if _ints(info["partition"], partition[n])[:1] == [SPLITS[split]]]
        if attr_rows is not None:
            missing = [n for n in found if n not in attr_rows]
            if missing:
                raise DataError(f"{info['attr']} has no row for {missing[0]} ({len(missing):,} images in "
                                "all); the attribute and partition files do not match: use the official "
                                "pair")
            rows = [_ints(info["attr"], attr_rows[n]) for n in found]
            if attr_names is None or any(len(r) != len(attr_names) for r in rows):
                raise DataError(f"{info['attr']}: rows do not have one value per attribute name; use the "
                                "official file")
            # (N, 40), 1 = has the attribute
            attrs = (torch.tensor(rows, dtype=torch.int8) > 0).to(torch.uint8)
        files = [by_name[n] for n in found]
        if partition is None and split != "all":
            files, attrs = _holdout(files, attrs, split)
    else:
        files, attrs = _holdout(on_disk, None, split)
    return dict(info, files=files, attrs=attrs, attr_names=attr_names, split=split)


def pick_attrs(sel, spec):
    """'all' or 'Smiling,Male' -> the attribute names, in the annotation file's order."""
    if sel["attrs"] is None:
        raise DataError(f"attributes {spec}: the {sel['layout']} layout at {sel['image_dir']} has no "
                        "attribute labels; use a CelebA root with list_attr_celeba.txt (torchvision) or "
                        "list_attr_celeba.csv (Kaggle), or no attributes")
    names = sel["attr_names"]
    wanted = names if spec == "all" else [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in wanted if a not in names]
    if unknown or not wanted or len(set(wanted)) < len(wanted):
        wrong = f"no attribute {unknown[0]!r}" if unknown else "name each attribute once"
        raise DataError(f"attributes {spec}: {wrong}"
                        + f"; choose 'all' or some of {','.join(names)}")
    return [a for a in names if a in wanted]


def _holdout(files, attrs, split):
    """Without an official partition: the last 2% of the sorted files, at least 1 and at most 1,000, are the
    valid (and test) slice. A folder of one image keeps it for training."""
    if split == "all":
        return files, attrs
    n_val = min(1000, max(1, len(files) // 50)) if len(files) > 1 else 0
    keep = slice(0, len(files) - n_val) if split == "train" else slice(len(files) - n_val, len(files))
    return files[keep], (attrs[keep] if attrs is not None else None)


def identity(sel):
    """What makes a selection the same data wherever it lies: a hash of the image paths relative to the image
    folder and their sizes. A moved or copied CelebA keeps it; other images, or more or fewer, change it."""
    h = hashlib.sha1()
    for f in sel["files"]:
        h.update(f"{os.path.relpath(f, sel['image_dir'])}|{os.path.getsize(f)}\n".encode())
    return h.hexdigest()[:16]

# -----------------------------------------------------------------------------
# images: the crop and preprocessing (the training images, and sample.py's --init and --mask)


def crop_box(w, h, crop):
    """(left, top, width, height) of the crop in a w x h image."""
    if crop == "auto":
        crop = "celeba" if (w, h) == (CELEBA_W, CELEBA_H) else "center"
    if crop == "celeba":  # the DDIM box, scaled if the image is not 178x218
        sx, sy = w / CELEBA_W, h / CELEBA_H
        side_x, side_y = round(CELEBA_SIDE * sx), round(CELEBA_SIDE * sy)
        return round(CELEBA_CX * sx) - side_x // 2, round(CELEBA_CY * sy) - side_y // 2, side_x, side_y
    if crop == "center":
        s = min(w, h)
        return (w - s) // 2, (h - s) // 2, s, s
    return 0, 0, w, h  # none: the whole frame, aspect squashed by the resize


def decode(path):
    """Any image file -> (3, H, W) uint8 RGB. Grayscale, RGBA, palette, CMYK and 16-bit are converted."""
    try:  # a truncated or corrupt JPEG raises here, and again in PIL below: the file is skipped
        img = decode_image(torchvision.io.read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        img = None
    if img is None:  # formats torchvision cannot take (e.g. CMYK or exotic PNGs): PIL, strictly
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16") or im.mode == "I":
                im = im.point(lambda v: v / 257).convert("L")
            img = TF.pil_to_tensor(im.convert("RGB"))
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = TF.to_dtype(img, torch.uint8, scale=True)
    return img


def preprocess(path, size, crop):
    """File -> (3, size, size) uint8: crop, then an antialiased resize."""
    img = decode(path)
    left, top, w, h = crop_box(img.shape[2], img.shape[1], crop)
    img = TF.crop(img, top, left, h, w)
    return TF.resize(img, [size, size], antialias=True)


def to_float(images, device):
    """(N, 3, H, W) uint8 -> floats in [-1, 1] on device."""
    return images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)


def to_uint8(x):
    """[-1, 1] -> (N, 3, H, W) uint8 on the CPU."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()

# -----------------------------------------------------------------------------
# decoding every image once, on all cores (the result is cached)


def _preprocess_or_none(job):
    path, size, crop = job
    try:  # raw bytes: torch would send every tensor through its own shared-memory segment
        return preprocess(path, size, crop).numpy().tobytes(), None
    except Exception as e:  # unreadable, corrupt or truncated: skipped with a warning
        return None, f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _worker_init():
    torch.set_num_threads(1)  # one image per process; cores come from the processes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: one line, not one per worker


def decode_all(files, size, crop, workers=None, log=print):
    """Preprocess every file on all cores (a process pool: torchvision's decoders hold the GIL).
    -> ((N, 3, size, size) uint8, kept indices, seconds)"""
    workers = min(workers or os.cpu_count() or 1, max(1, len(files) // 64))
    images, kept, bad = torch.empty(len(files), 3, size, size, dtype=torch.uint8), [], []
    fork = "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
    progress = util.Progress(len(files), f"data: decoding on {workers} process{'es' if workers > 1 else ''}",
                             "images", log, every=5, first=True)
    try:
        done = pool.map(_preprocess_or_none, [(f, size, crop) for f in files], chunksize=32)
        for i, (img, err) in enumerate(done):
            if err:
                bad.append(err)
                if len(bad) <= MAX_WARNINGS:
                    log(f"warning: skipped unreadable image {err}")
            else:
                images[len(kept)] = torch.frombuffer(bytearray(img), dtype=torch.uint8).view(3, size, size)
                kept.append(i)
            progress(i + 1)
    except concurrent.futures.process.BrokenProcessPool:  # a worker was killed (out of memory, or by hand)
        raise DataError(f"a decoding process died after {len(kept) + len(bad):,} of {len(files):,} images "
                        "(out of memory, or killed?); nothing was cached: run again")
    finally:  # also on Ctrl-C: drop the queued work, let the running chunks end
        pool.shutdown(wait=True, cancel_futures=True)
    if len(bad) > MAX_WARNINGS:
        log(f"warning: {len(bad) - MAX_WARNINGS:,} more unreadable images skipped ({len(bad):,} in all)")
    return images[: len(kept)].clone(), kept, time.time() - progress.t0

# -----------------------------------------------------------------------------
# the cache: one file per (data path, split, crop, size)


def _fingerprint(files, info):
    """Names, sizes and mtimes of the selected files and annotations: any change means a stale cache."""
    h = hashlib.sha1()
    for f in files + [info["partition"] or "", info["attr"] or ""]:
        st = os.stat(f) if f else None
        h.update(f"{f}|{st.st_size if st else 0}|{st.st_mtime_ns if st else 0}\n".encode())
    return h.hexdigest()


def cache_file(cache_dir, path, split, crop, size):
    key = f"{os.path.abspath(os.path.expanduser(path))}|{split}|{crop}|{size}"
    key = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"faces-{split}-{crop}-{size}-{key}.pt")


def load(path, size, split="train", crop="auto", cache_dir=None, workers=None, log=print, attrs=None,
         sel=None):
    """The images of one split as a uint8 tensor, from the cache when it is fresh.
    -> dict(images (N, 3, size, size) uint8, attrs (N, 40) uint8 or None, attr_names, files, layout, cache,
    ..., cond (N, K) uint8 and cond_names: the columns `attrs` ('all' or 'Smiling,Male') asks for, or None)
    Attributes the data cannot give are an error raised before any decoding."""
    if split not in (*SPLITS, "all") or crop not in CROPS or size < 1:
        raise ValueError(f"split {split!r}, crop {crop!r}, size {size}: the split is one of "
                         f"{', '.join(SPLITS)} or all, the crop one of {', '.join(CROPS)}, the size positive")
    sel = sel or select(path, split, log)  # a caller that has selected already passes its selection
    if not sel["files"]:
        raise DataError(f"data folder {path}: no {split} images"
                        + (" (a folder of one image keeps it for training)" if sel["layout"] == "folder"
                           else ""))
    cond_names = pick_attrs(sel, attrs) if attrs else None
    cache = cache_file(cache_dir or default_cache_dir(), path, split, crop, size)
    util.check_writable(os.path.dirname(cache), "cache folder")  # fail before decoding, not after
    util.remove_stale_temporaries(os.path.dirname(cache))  # left by a process killed while it wrote a cache
    fingerprint = _fingerprint(sel["files"], sel)
    if os.path.exists(cache):
        t0 = time.time()
        try:
            c = torch.load(cache, mmap=True, weights_only=True)
            ok = (c.get("version") == CACHE_VERSION and c.get("fingerprint") == fingerprint
                  and c["images"].shape[0] == len(c["files"]) and c["images"].shape[1:] == (3, size, size))
            if ok and util.tensor_crc(c["images"]) == c["checksum"]:
                log(f"data: loaded {len(c['files']):,} {split} images from cache {cache} in "
                    f"{time.time() - t0:.1f}s")
                return with_cond(dict(sel, **c, cache=cache, decode_seconds=None), cond_names)
            why = "corrupt (its image bytes fail their checksum)" if ok else "stale (the data changed)"
            log(f"data: cache {cache} is {why}; rebuilding")
        except Exception as e:
            log(f"data: cache {cache} is unreadable ({type(e).__name__}); rebuilding")
    log(f"data: {sel['layout']} layout in {sel['image_dir']}: decoding {len(sel['files']):,} {split} images "
        f"once (crop {crop}, size {size})")
    images, kept, seconds = decode_all(sel["files"], size, crop, workers, log)
    if not kept:
        raise DataError(f"data folder {path}: none of the {len(sel['files']):,} images could be read; check "
                        "the files")
    c = dict(version=CACHE_VERSION, fingerprint=fingerprint, images=images, checksum=util.tensor_crc(images),
             files=[sel["files"][i] for i in kept],
             attrs=sel["attrs"][kept] if sel["attrs"] is not None else None)
    # a failed write never leaves a half-written cache
    util.atomic_write(lambda tmp: torch.save(c, tmp), cache, "cache folder")
    log(f"data: wrote cache {cache} ({images.numel() / 2**20:,.0f} MiB)")
    return with_cond(dict(sel, **c, cache=cache, decode_seconds=seconds), cond_names)


def with_cond(d, cond_names):
    cols = [d["attr_names"].index(a) for a in cond_names] if cond_names else None
    return dict(d, cond=d["attrs"][:, cols] if cols else None, cond_names=cond_names)

# -----------------------------------------------------------------------------
# serving batches


class Batches:
    """Random training batches from the uint8 image tensor, with horizontal flips done on the batch.

    Every rank holds the same images and draws the same per-epoch permutation; a global batch of
    `batch_size` images is split into `world` equal shards and rank r takes shard r. So the batches
    are the same whatever the number of GPUs, and resuming under another world size continues the
    same data order."""

    def __init__(self, images, batch_size, device, seed, rank=0, world=1, flip=True, attrs=None,
                 resident=None):
        """resident: keep the images on the GPU (default: when fits_on_gpu says they fit)."""
        if batch_size % world or len(images) < batch_size:
            raise ValueError(f"a batch of {batch_size} must divide into {world} equal shards and fit in the "
                             f"{len(images):,} images")
        device = torch.device(device)
        if fits_on_gpu(images.nbytes, device) if resident is None else resident:
            images = images.to(device)  # GPU-resident: a batch is one gather, no host copies
        elif device.type == "cuda":
            images = images.pin_memory()
        self.images, self.batch_size, self.device, self.seed = images, batch_size, device, seed
        self.attrs = attrs.to(device) if attrs is not None else None  # (N, K) uint8 0/1
        self.rank, self.world, self.flip = rank, world, flip
        self.steps_per_epoch = len(images) // batch_size  # the last partial batch of an epoch is dropped
        self._perm_epoch, self._perm = None, None

    def get(self, step, generator):
        """The local shard of global batch `step` (0-based): ((B/world, 3, H, W) floats in [-1, 1], its
        attributes (B/world, K) uint8 or None). `generator` (on self.device) draws the flips, which keep
        every attribute."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:  # a fixed permutation per epoch, the same on every rank
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(len(self.images), generator=g).to(self.images.device)
            self._perm_epoch = epoch
        b = self.batch_size // self.world
        mine = slice(self.rank * b, (self.rank + 1) * b)  # this rank's shard of the global batch
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size][mine]
        x = to_float(self.images[idx], self.device)
        if self.flip:
            flip = torch.rand(self.batch_size, generator=generator, device=self.device)[mine] < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x, (self.attrs[idx.to(self.attrs.device)] if self.attrs is not None else None)


def fits_on_gpu(nbytes, device):
    """Whether `nbytes` of training images should live on `device`: a GPU with 30% of its free memory to
    spare."""
    device = torch.device(device)
    return device.type == "cuda" and nbytes < 0.3 * torch.cuda.mem_get_info(device)[0]

# -----------------------------------------------------------------------------
# the download


DOWNLOAD_HELP = ("get CelebA by hand: the 'Align&Cropped Images' img_align_celeba.zip plus "
                 "list_attr_celeba.txt and list_eval_partition.txt from the CelebA website "
                 "(mmlab.ie.cuhk.edu.hk/projects/CelebA.html) or its Google Drive, unzipped as "
                 "PATH/celeba/img_align_celeba/*.jpg with the two .txt files in PATH/celeba/; or Kaggle's "
                 "'jessicali9530/celeba-dataset' unzipped as is; then give PATH as the data folder")
NO_NETWORK = ("Name or service not known", "Temporary failure in name resolution", "Network is unreachable",
              "Connection refused", "timed out", "nodename nor servname", "No route to host", "Max retries "
                                                                                              "exceeded",
              "ConnectionError", "URLError")
QUOTA = ("Too many users", "quota", "Cannot retrieve the public link", "FileURLRetrievalError")


def download_failure(e):
    """What went wrong in a failed download, in words: no network, a Google Drive refusal, or other."""
    chain = []
    while e is not None and len(chain) < 10:  # the exception and what caused it
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    text = " | ".join(chain)
    if any(k in text for k in QUOTA):
        return "Google Drive refused the file (its quota for CelebA is used up; this often lasts a day)"
    if any(k in text for k in NO_NETWORK):
        return "no network: Google Drive could not be reached"
    return chain[0].splitlines()[0][:300]


def download(path, log=print):
    """torchvision's CelebA download (it needs the gdown package for Google Drive); on failure a DataError
    that says why and how to get CelebA by hand. A folder the failed attempt left empty is removed."""
    if importlib.util.find_spec("gdown") is None:
        raise DataError("the CelebA download needs the gdown package, which torchvision uses for Google "
                        f"Drive: pip install gdown. Or {DOWNLOAD_HELP}")
    log(f"data: trying torchvision's CelebA download into {path} (about 1.4 GB; Google Drive often refuses "
        "with a quota error)")
    existed = os.path.exists(path)
    try:
        torchvision.datasets.CelebA(path, split="all", target_type="attr", download=True)
    except Exception as e:
        # leave nothing empty behind that was not there before
        for folder in (os.path.join(path, "celeba"), path):
            if os.path.isdir(folder) and not os.listdir(folder) and (folder != path or not existed):
                os.rmdir(folder)
        raise DataError(f"the CelebA download failed: {download_failure(e)}. Or {DOWNLOAD_HELP}")

# -----------------------------------------------------------------------------
# python data.py: check a data folder


def get_args(argv=None):
    p = util.Parser(description="Check a CelebA folder: layout, splits, cache, decode speed and a preview "
                                "of the crop.")
    p.add_argument("--data", required=True, type=util.path, help="CelebA root (torchvision or Kaggle "
                   "layout) or any folder of images")
    p.add_argument("--size", type=util.positive(int), default=64, help="image size after crop and resize")
    p.add_argument("--split", default="train", choices=[*SPLITS, "all"], help="which split")
    p.add_argument("--crop", default="auto", choices=CROPS, help="auto: the DDIM CelebA box for 178x218 "
                   "images, else a centre square; celeba, center, or none (squash)")
    p.add_argument("--cache-dir", type=util.path, default=None, help="where the decoded tensors go "
                   "(default: $XDG_CACHE_HOME or ~/.cache, then ddpm-faces)")
    p.add_argument("--workers", type=util.positive(int), default=None, help="decoding processes (default: "
                                                                            "all cores)")
    p.add_argument("--batch-size", type=util.positive(int), default=128, help="batch size for the serving "
                                                                              "speed")
    p.add_argument("--preview", default="data_preview.png", help="write a grid of 64 preprocessed images "
                   "here ('' to skip)")
    p.add_argument("--export", type=util.path, default=None, metavar="DIR",
                   help="also write every preprocessed image as a PNG into DIR (for FID statistics)")
    p.add_argument("--download", action="store_true", help="first try torchvision's CelebA download into "
                                                           "--data")
    return p.parse_args(argv)


def summary(d, split, workers, t0):
    print(f"layout:  {d['layout']} ({d['image_dir']})")
    labels = f", {len(d['attr_names'])} attributes" if d["attrs"] is not None else ", no labels"
    print(f"images:  {len(d['files']):,} in split '{split}'{labels}")
    if d["partition"]:
        _, part = _read_table(d["partition"])
        present = {os.path.basename(f) for f in list_images(d["image_dir"])}
        counts = {s: sum(1 for n, v in part.items() if n in present and _ints(d["partition"], v)[:1] == [k])
                  for s, k in SPLITS.items()}
        print("splits:  " + ", ".join(f"{s} {n:,}" for s, n in counts.items()) + " (official partition, on "
                                                                                 "disk)")
    print(f"cache:   {d['cache']} ({d['images'].numel() / 2**20:,.1f} MiB)")
    if d["decode_seconds"]:
        n = workers or os.cpu_count()
        print(f"decode:  {len(d['files']) / d['decode_seconds']:,.0f} img/s on {n} "
              f"process{'es' if n > 1 else ''}")
    else:
        print(f"decode:  cached, loaded in {time.time() - t0:.1f}s")


def serving_speed(images, batch_size):
    """How fast training batches come out of the cache."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    b, g = Batches(images, batch_size, device, seed=0), torch.Generator(device=device)
    b.get(0, g)
    t1, n = time.time(), 0
    while time.time() - t1 < 2 or n < 10:
        b.get(n, g)
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.time() - t1
    print(f"serve:   {n / dt:,.0f} batches/s of {batch_size} on {device} ({n * batch_size / dt:,.0f} img/s)")


def main(argv=None):
    args = get_args(argv)
    try:
        if args.export:
            util.check_writable(args.export, "--export")
        if args.download:
            download(args.data)
        t0 = time.time()
        d = load(args.data, args.size, args.split, args.crop, args.cache_dir, args.workers)
        summary(d, args.split, args.workers, t0)
        if len(d["images"]) >= args.batch_size:
            serving_speed(d["images"], args.batch_size)
        if args.preview:
            util.save_image(d["images"][:64], args.preview, "--preview", nrow=8, padding=2)
            print(f"preview: {args.preview}")
        if args.export:  # each file whole or not at all: a full disk stops the export with an error
            for f, img in zip(d["files"], d["images"]):
                name = os.path.splitext(os.path.basename(f))[0] + ".png"
                util.write_png(img, os.path.join(args.export, name), "--export")
            print(f"export:  {len(d['files']):,} PNGs in {args.export}")
    except (OSError, DataError, util.UsageError, util.WriteError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing was cached; run again to decode", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
