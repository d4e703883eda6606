"""
CelebA loading: find the layout, choose the split, crop and resize every image once into a uint8 tensor
cache, then serve random batches from memory (on the GPU when it fits). Also the crop, which sample.py
applies to an image it edits.

Layouts accepted as the data folder PATH:
  torchvision  PATH/celeba/img_align_celeba/*.jpg + list_eval_partition.txt, list_attr_celeba.txt (or
               the same in PATH itself)
  kaggle       PATH/img_align_celeba/img_align_celeba/*.jpg + list_eval_partition.csv, list_attr_celeba.csv
  folder       any folder of .jpg/.jpeg/.png/.webp images, searched recursively, no labels

    python data.py --data ~/data/celeba --size 64                    # summary, cache, preview grid
    python data.py --data ~/data/celeba --size 64 --export fid_ref   # PNGs for FID reference statistics
"""
import collections
import concurrent.futures
import contextlib
import csv
import glob
import hashlib
import importlib.util
import json
import math
import multiprocessing
import os
import re
import signal
import time
import warnings
import zlib

import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

import budget
import util

IMG_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CROPS = ("auto", "celeba", "center", "none")
# the crop of the DDIM CelebA-64 reference: a 128x128 box centred at (x=89, y=121) of the 178x218 image
CELEBA_W, CELEBA_H, CELEBA_CX, CELEBA_CY, CELEBA_SIDE = 178, 218, 89, 121, 128
warnings.filterwarnings("ignore", message=".*TorchCodec.*")  # torchvision 0.29 deprecates its codecs
SPLITS = {"train": 0, "valid": 1, "test": 2}
CACHE_VERSION = 3  # 2: a CRC-32 of the image bytes, verified on load; 3: identity() with times
MAX_WARNINGS = 10
MAX_UPSCALE = 4  # a size more than this many times the images' crop is refused


class DataError(Exception):
    """Bad data (no folder, no images, annotations that do not fit): one line that names the fix."""


def default_cache_dir():
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ddpm-faces")

# -----------------------------------------------------------------------------
# layout detection and annotation files


def _read_table(path):
    """list_*.txt or .csv -> (column names or None, {image name: (line number, its values)}). The values stay
    text until `_ints` parses the rows used (splitting all 202,599 takes seconds)."""
    with open(path, newline="") as f:
        if path.endswith(".csv"):  # image_id,5_o_Clock_Shadow,...
            rows = [(i + 1, r[0], r[1:]) for i, r in enumerate(csv.reader(f)) if r]
        else:  # the official txt: the attribute file starts with a count line and a names line
            rows = [(i + 1, *(line.split(None, 1) + [""])[:2]) for i, line in enumerate(f) if line.strip()]
    header = None
    if path.endswith(".csv"):
        header, rows = (rows[0][2] if rows else []), rows[1:]
    elif rows and rows[0][1].isdigit() and not rows[0][2].strip():
        header, rows = [rows[1][1]] + rows[1][2].split(), rows[2:]
    return header, {name: (lineno, raw) for lineno, name, raw in rows}


def _ints(path, row):
    try:
        return [int(v) for v in (row[1].split() if isinstance(row[1], str) else row[1])]
    except ValueError:
        raise DataError(f"{path} line {row[0]}: expected an image name and integers; is it an official "
                        "CelebA annotation file?")


def find_layout(path):
    """-> dict(layout, image_dir, partition file or None, attr file or None)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        raise DataError(f"data folder {path}: is a file; give a folder (the CelebA root or a folder of "
                        "images)")
    if not os.path.isdir(path):
        raise DataError(f"data folder {path}: no such folder; give your CelebA folder (README, 'Getting "
                        "CelebA')")
    celeba, aligned = os.path.join(path, "celeba"), os.path.join("img_align_celeba", "img_align_celeba")
    for layout, ext, root, images in [("torchvision", "txt", celeba, "img_align_celeba"),
                                      ("torchvision", "txt", path, "img_align_celeba"),
                                      ("kaggle", "csv", path, aligned),
                                      ("kaggle", "csv", path, "img_align_celeba")]:
        part, attr = (os.path.join(root, f"list_{name}.{ext}") for name in ("eval_partition", "attr_celeba"))
        part, attr = (f if os.path.isfile(f) else None for f in (part, attr))
        if os.path.isdir(os.path.join(root, images)) and (part or attr):
            return dict(layout=layout, image_dir=os.path.join(root, images), partition=part, attr=attr)
    return dict(layout="folder", image_dir=path, partition=None, attr=None)


def list_images(image_dir):
    files = []
    for dirpath, dirnames, filenames in os.walk(image_dir, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)
                  if f.lower().endswith(IMG_EXTS) and not f.startswith(".")]
    return files


def select(path, split="train", log=print):
    """The images of one split. -> find_layout's dict with files, attrs ((N, 40) 0/1 or None), attr_names."""
    info = find_layout(path)
    files = list_images(info["image_dir"])
    attrs = None
    attr_names = None
    if not files:
        raise DataError(f"data folder {info['image_dir']}: no images found (looked for {', '.join(IMG_EXTS)} "
                        "recursively); give the folder that holds img_align_celeba, or your images")
    part_file, attr_file = info["partition"], info["attr"]
    if not (part_file or attr_file):
        return dict(info, files=_holdout(files, split), attrs=None, attr_names=None, split=split)
    by_name = {os.path.basename(f): f for f in files}
    _, partition = _read_table(part_file) if part_file else (None, None)
    attr_names, attr_rows = _read_table(attr_file) if attr_file else (None, None)
    listed = list(partition or attr_rows)
    names = [n for n in listed if n in by_name]
    if not names:
        raise DataError(f"{part_file or attr_file} lists {len(listed):,} images but none of the "
                        f"{len(files):,} in {info['image_dir']}; the annotation files do not belong to these "
                        "images: use matching files or remove them to load a plain folder")
    if len(names) < len(listed):
        log(f"data: {len(names):,} of {len(listed):,} listed images found")
    if partition is None:
        names = _holdout(names, split)
    elif split != "all":
        names = [n for n in names if _ints(part_file, partition[n])[:1] == [SPLITS[split]]]
    if attr_rows is not None:
        missing = [n for n in names if n not in attr_rows]
        if missing:
            raise DataError(f"{attr_file} has no row for {missing[0]} ({len(missing):,} images in all); the "
                            "attribute and partition files do not match: use the official pair")
        rows = [_ints(attr_file, attr_rows[n]) for n in names]
        if attr_names is None or any(len(r) != len(attr_names) for r in rows):
            raise DataError(f"{attr_file}: rows do not have one value per attribute name; use the official "
                            "file")
        attrs = (torch.tensor(rows, dtype=torch.int8) > 0).to(torch.uint8)  # (N, 40), 1 = has the attribute
    return dict(info, files=[by_name[n] for n in names], attrs=attrs, attr_names=attr_names, split=split)


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
        raise DataError(f"attributes {spec}: {wrong}; choose 'all' or some of {','.join(names)}")
    return [a for a in names if a in wanted]


def _holdout(files, split):
    """Without an official partition: the last 2% of the sorted files (1 to 1,000) are the valid and test
    slice; a folder of one image keeps it for training."""
    n_val = min(1000, max(1, len(files) // 50)) if len(files) > 1 and split != "all" else 0
    return files[:len(files) - n_val] if split in ("train", "all") else files[len(files) - n_val:]


def identity(sel, stamps=False):
    """A hash of the image paths (relative to the image folder) and sizes: a moved copy keeps it. With
    `stamps`, also the times and annotation files: the cache's freshness."""
    h = hashlib.sha1()
    for f in sel["files"]:
        st = os.stat(f)
        stamp = f"|{st.st_mtime_ns}" if stamps else ""
        h.update(f"{os.path.relpath(f, sel['image_dir'])}|{st.st_size}{stamp}\n".encode())
    for f in filter(None, [sel["partition"], sel["attr"]] if stamps else []):
        h.update(f"{f}|{os.stat(f).st_mtime_ns}\n".encode())
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
    """An image file -> (3, H, W) uint8 RGB (from any mode, 16-bit too); raises if corrupt."""
    img = decode_image(torchvision.io.read_file(path), mode=ImageReadMode.RGB)
    return TF.to_dtype(img, torch.uint8, scale=True)  # a 16-bit PNG comes as uint16


def preprocess(path, size, crop):
    """File -> (3, size, size) uint8: crop, then an antialiased resize."""
    return prepare(decode(path), size, crop)


def prepare(img, size, crop):
    """(3, H, W) uint8 -> (3, size, size): crop, then an antialiased resize."""
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
    """-> (the preprocessed image's bytes or None, why it could not be read or None, whether its crop was
    under half the size: upscaled more than twice)."""
    path, size, crop = job
    try:
        img = decode(path)
    except Exception as e:  # unreadable, corrupt or truncated: skipped with a warning
        return None, f"{path}: {reason(e)}", False
    _, _, w, h = crop_box(img.shape[2], img.shape[1], crop)
    # raw bytes: torch would send every tensor through its own shared-memory segment
    return prepare(img, size, crop).numpy().tobytes(), None, min(w, h) < size / 2


def reason(e):
    """An exception in a few words: torchvision's decoders name their source file ('decode_jpeg,
    /__w/.../decode_jpeg.cpp:171, Image is incomplete or truncated'), which says nothing to a user."""
    first = (str(e).splitlines() or [""])[0]
    if "Unsupported image file" in first:  # torchvision names its own functions to call instead
        return "not a JPEG, PNG, WebP or GIF image (its bytes are of another format)"
    parts = [p for p in first.split(", ") if not re.search(r"/\S*\.(cpp|h|c):\d+", p)]
    return f"{type(e).__name__}: {', '.join(parts)}"


def _worker_init():
    torch.set_num_threads(1)  # one image per process; cores come from the processes
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: one line, not one per worker
    for s in util.STOPS[1:]:  # SIGTERM and SIGHUP end a worker as the pool expects (not the main's one line)
        signal.signal(s, signal.SIG_DFL)


def check_upscale(files, size, crop, need):
    """Refuse, before decoding, a size far beyond the images: over MAX_UPSCALE times the side of the largest
    crop among the first 32 files (their headers read; `need` the bytes the decoded images would take)."""
    sides = []
    for f in files[:32]:
        with contextlib.suppress(Exception):  # an unreadable file is skipped when the images are decoded
            with Image.open(f) as img:
                w, h = img.size
            _, _, cw, ch = crop_box(w, h, crop)
            sides.append((min(cw, ch), w, h))
    if not sides or size <= MAX_UPSCALE * max(sides)[0]:
        return
    side, w, h = max(sides)
    raise DataError(f"a size of {size} is {size / side:.0f} times the images' crop ({side} pixels on a side, "
                    f"of {w}x{h} images): upscaling beyond {MAX_UPSCALE}x adds no detail and would take "
                    f"{util.fmt_bytes(need)}; use a size of {MAX_UPSCALE * side} or less")


def decode_all(files, size, crop, log=print):
    """Preprocess every file in a process pool (torchvision's decoders hold the GIL).
    -> ((N, 3, size, size) uint8, kept indices, seconds)"""
    workers = min(os.cpu_count() or 1, max(1, len(files) // 64))
    need = len(files) * 3 * size * size
    available = budget.device_memory(torch.device("cpu"))
    if need > 0.9 * available:
        raise DataError(f"{len(files):,} images at {size}x{size} take {util.fmt_bytes(need)} decoded, more "
                        f"than the {util.fmt_bytes(available)} of memory available; use a smaller image size")
    images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    kept = []  # the indices of the images read
    bad = []  # why the others could not be
    small = []  # the files upscaled more than twice
    start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context(start), _worker_init)
    processes = util.plural(workers, "process", "processes")
    progress = util.Progress(len(files), f"data: decoding on {processes}", "images", log, every=5, first=True)
    try:
        done = pool.map(_preprocess_or_none, [(f, size, crop) for f in files], chunksize=32)
        for i, (img, err, tiny) in enumerate(done):
            if tiny:
                small.append(files[i])
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
    if small:
        log(f"note: {len(small):,} image{'s were' if len(small) > 1 else ' was'} upscaled more than twice to "
            f"{size}x{size} (their crop under {size // 2} pixels on a side; {os.path.basename(small[0])} the "
            "first): they will look blurred")
    return images[: len(kept)].clone(), kept, time.time() - progress.t0

# -----------------------------------------------------------------------------
# the cache: one file per (data path, split, crop, size)


def cache_file(cache_dir, path, split, crop, size):
    key = f"{os.path.abspath(os.path.expanduser(path))}|{split}|{crop}|{size}"
    key = hashlib.sha1(key.encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"faces-{split}-{crop}-{size}-{key}.pt")


def load(path, size, split="train", crop="auto", cache_dir=None, log=print, attrs=None, sel=None):
    """The images of one split (of `sel` if given), from the cache when it is fresh. -> the selection with
    images (N, 3, size, size) uint8, cache, decode_seconds, cond (N, K) uint8 and cond_names: the
    attributes `attrs` names ('all' or 'Smiling,Male')."""
    sel = sel or select(path, split, log)
    if not sel["files"]:
        raise DataError(f"data folder {path}: no {split} images" + (
            " (a folder of one image keeps it for training)" if sel["layout"] == "folder" else ""))
    cond_names = pick_attrs(sel, attrs) if attrs else None
    cache = cache_file(cache_dir or default_cache_dir(), path, split, crop, size)
    util.check_writable(os.path.dirname(cache), "cache folder")  # fail before decoding, not after
    fingerprint = identity(sel, stamps=True)
    if os.path.exists(cache):
        t0 = time.time()
        try:
            c = torch.load(cache, mmap=True, weights_only=True)
            ok = (c.get("version") == CACHE_VERSION and c.get("fingerprint") == fingerprint
                  and c["images"].shape == (len(c["files"]), 3, size, size))
            if ok and util.tensor_crc(c["images"]) == c["checksum"]:
                log(f"data: loaded {len(c['files']):,} {split} images from cache {cache} in "
                    f"{time.time() - t0:.1f}s")
                return with_cond(dict(sel, **c, cache=cache, decode_seconds=None), cond_names)
            why = "corrupt (its bytes fail their checksum)" if ok else "stale (new data or version)"
            log(f"data: cache {cache} is {why}; rebuilding")
        except Exception as e:
            log(f"data: cache {cache} is unreadable ({type(e).__name__}); rebuilding")
    check_upscale(sel["files"], size, crop, len(sel["files"]) * 3 * size * size)
    log(f"data: {sel['layout']} layout in {sel['image_dir']}: decoding {len(sel['files']):,} {split} images "
        f"once (crop {crop}, size {size})")
    images, kept, seconds = decode_all(sel["files"], size, crop, log)
    if not kept:
        raise DataError(f"data folder {path}: none of the {len(sel['files']):,} images could be read; check "
                        "the files")
    c = dict(version=CACHE_VERSION, fingerprint=fingerprint, images=images, checksum=util.tensor_crc(images),
             files=[sel["files"][i] for i in kept],
             attrs=sel["attrs"][kept] if sel["attrs"] is not None else None)
    util.atomic_write(lambda tmp: torch.save(c, tmp), cache, "cache folder")  # never a half-written cache
    log(f"data: wrote cache {cache} ({images.numel() / 2**20:,.0f} MiB)")
    return with_cond(dict(sel, **c, cache=cache, decode_seconds=seconds), cond_names)


def with_cond(d, cond_names):
    cols = [d["attr_names"].index(a) for a in cond_names] if cond_names else None
    return dict(d, cond=d["attrs"][:, cols] if cols else None, cond_names=cond_names)

# -----------------------------------------------------------------------------
# captions: a .txt beside each image, or a metadata.jsonl (Hugging Face's imagefolder layout)


def captions(sel):
    """The captions of a selection's files, in their order: from a metadata.jsonl in the image folder (lines
    of {"file_name": path relative to it, "text": caption}) or a .txt of the same name beside each image. -> a
    list of captions, or None where the folder has neither (CelebA: captions come from its attributes). Images
    without a caption, empty and non-UTF-8 captions are refused in one line that names them."""
    metadata = os.path.join(sel["image_dir"], "metadata.jsonl")
    texts = {}
    if os.path.isfile(metadata):
        with open(metadata, "rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    row = json.loads(line.decode("utf-8")) if line.strip() else None
                except (UnicodeDecodeError, ValueError) as e:
                    raise DataError(f"{metadata} line {lineno}: not a JSON object in UTF-8 "
                                    f"({type(e).__name__}); "
                                    'write one {"file_name": ..., "text": ...} per line')
                if row is not None:
                    path = os.path.join(sel["image_dir"], row.get("file_name", ""))
                    texts[os.path.normpath(path)] = row.get("text")
    else:
        for f in sel["files"]:
            txt = os.path.splitext(f)[0] + ".txt"
            if os.path.isfile(txt):
                with open(txt, "rb") as t:
                    raw = t.read()
                try:
                    texts[os.path.normpath(f)] = raw.decode("utf-8").strip()
                except UnicodeDecodeError:
                    raise DataError(f"{txt}: not UTF-8 text; save the caption as UTF-8")
        if not texts:
            return None
    found = [texts.get(os.path.normpath(f)) for f in sel["files"]]
    missing = [os.path.basename(f) for f, c in zip(sel["files"], found) if c is None]
    if missing:
        where = "a line in metadata.jsonl" if os.path.isfile(metadata) else "a .txt beside it"
        raise DataError(f"{len(missing):,} of the {len(found):,} {sel['split']} images have no caption "
                        f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); give each {where}")
    empty = [os.path.basename(f) for f, c in zip(sel["files"], found) if not str(c).strip()]
    if empty:
        raise DataError(f"{len(empty):,} captions are empty ({', '.join(empty[:3])}); write one for each "
                        "image")
    return [str(c) for c in found]


def validation_set(path, size, crop, cache_dir, n, attrs, encode, device, log=print, condition=None):
    """A training run's validation set: the first n images of the valid split in [-1, 1] on `device`, through
    encode() (a latent run's first stage: their scaled latents), and the attributes `attrs` names as +1/-1
    (or None; condition(the split's load() dict, n): another condition, a text model's tokens). -> (x, cond),
    or None (with a line that says why) where there is no valid split."""
    try:
        v = load(path, size, "valid", crop, cache_dir, log=log, attrs=attrs)
    except DataError as e:
        log(f"no validation loss: {e}")
        return None
    x = to_float(v["images"][:n], device)
    with torch.no_grad():
        x = torch.cat([encode(part) for part in x.split(256)])
    cond = None
    if attrs:  # every attribute given
        cond = v["cond"][:n].to(device).float() * 2 - 1
    if condition is not None:
        cond = condition(v, n).to(device)
    return x, cond

# -----------------------------------------------------------------------------
# the latents of a latent run: one cache per (images, autoencoder), streamed from the images


LATENT_VERSION = 1
LATENT_DTYPE = torch.float16  # its rounding costs less than bf16's (REPORT sec. 3.11)
LATENT_ORDER = 0  # the seed of the order the cache holds the images in: any prefix is a random subset
SMALL_SPLIT = 2**30  # bytes: a split that decodes to less goes through the pixel cache (kept for later runs)
WINDOW = 1024  # images decoded at a time while they stream to the encoder


def encode_latents(path, size, crop, cache_dir, encode, key, *, flip=True, logvar=False, count=None,
                   seconds=math.inf, device="cpu", log=print, attrs=None, sel=None, source=None, batch=256):
    """The latents of the train split: encode(x) -> (mean, logvar) of q(z | x) for a batch x (B, 3, H, W) in
    [-1, 1], of each image (and its mirror image, with `flip`), in a fixed random order of the split, the
    first `count` (default: all) or as many as `seconds` allow. Cached once per (images, autoencoder): `key`
    names the autoencoder (`source`, its path, lets a replaced one's cache be found and removed). Kept: the
    posterior means (and log-variances, with `logvar`) in float16, in a file of the whole split's size,
    memory-mapped: the host never holds two copies, and a later run continues an unfinished cache. The pixels
    come from the pixel cache where there is one, or the split is small; else they are decoded as they are
    encoded, so the split's pixels are never held at once. -> dict(latents (n, F, C or 2C, h, w) float16,
    cond, cond_names, stats (n, sum, sum of squares) of the latents learned from view 0: the means (for
    `logvar`, a sample))."""
    sel = sel or select(path, "train", log)
    cond_names = pick_attrs(sel, attrs) if attrs else None
    cache = os.path.splitext(cache_file(cache_dir or default_cache_dir(), path, "train", crop, size))[0]
    name = f"{cache}-latents-{key}{'-flip' if flip else ''}{'-logvar' if logvar else ''}"
    util.check_writable(os.path.dirname(name), "cache folder")
    order = torch.randperm(len(sel["files"]), generator=torch.Generator().manual_seed(LATENT_ORDER)).tolist()
    head = latent_header(name, identity(sel, stamps=True), key, len(order), log)
    if head is None:
        remove_replaced_latents(cache, key, log)
        head = dict(version=LATENT_VERSION, fingerprint=identity(sel, stamps=True), key=key, source=source,
                    flip=flip, logvar=logvar, slots=len(order), done=0, rows=0, skipped=[], crc=0,
                    stats=[0, 0.0, 0.0], shape=None, seconds_per_row=0.0)
    want = len(order) if count is None else min(count, len(order))
    if count is None and head["rows"] and math.isfinite(seconds):  # what `seconds` encode at the pace so far
        want = min(want, max(head["rows"], int(seconds / head["seconds_per_row"])))  # (a warm cache: nothing)
    if head["rows"] < want and head["done"] < len(order):
        head = encode_more(head, name, sel, order, size, crop, encode, flip, logvar, want, seconds, device,
                           log, path, cache_dir, batch)
    n = min(want, head["rows"])
    if n == 0:
        raise DataError(f"data folder {path}: none of its images could be encoded (unreadable, or no time "
                        "was left for them)")
    latents = torch.from_file(name + ".bin", shared=False, size=head["slots"] * math.prod(head["shape"]),
                              dtype=LATENT_DTYPE).view(head["slots"], *head["shape"])[:n]
    skipped = set(head["skipped"])
    rows = [i for i in order[:head["done"]] if i not in skipped][:n]  # the split's index of each row
    attrs = None
    cond = None
    if sel["attrs"] is not None:
        attrs = sel["attrs"][rows]
        cond = with_cond(dict(sel, attrs=attrs), cond_names)["cond"]
    return dict(sel, latents=latents, attrs=attrs, cond=cond, cond_names=cond_names,
                stats=stats_of(head, n, latents), files=[sel["files"][i] for i in rows])


def latent_header(name, fingerprint, key, slots, log):
    """The header of an earlier run's latent cache, checked: of these images and this autoencoder, its rows'
    bytes intact. -> it, or None (and the stale or damaged files removed, with a line that says why)."""
    try:
        with open(name + ".json") as f:
            head = json.load(f)
    except (OSError, ValueError):
        head = None
    why = "unreadable"
    if head and (head.get("version"), head.get("fingerprint"), head.get("key"), head.get("slots")) != (
            LATENT_VERSION, fingerprint, key, slots):
        why = "stale (other images, or another version)"
    elif head and os.path.exists(name + ".bin"):
        row = math.prod(head["shape"]) * LATENT_DTYPE.itemsize if head["rows"] else 0
        with open(name + ".bin", "rb") as f:
            crc = 0
            for i in range(0, head["rows"] * row, 2**26):
                crc = zlib.crc32(f.read(min(2**26, head["rows"] * row - i)), crc)
        if crc == head["crc"]:
            log(f"latents: cache {name}.bin holds those of {util.plural(head['rows'], 'image')}")
            return head
        why = "corrupt (its bytes fail their checksum)"
    if os.path.exists(name + ".json") or os.path.exists(name + ".bin"):
        log(f"latents: cache {name} is {why}; rebuilding")
    for ext in (".json", ".bin"):
        with contextlib.suppress(OSError):
            os.remove(name + ext)
    return None


def remove_replaced_latents(cache, key, log):
    """Remove the latent caches of these images whose autoencoder file is gone or now holds other weights
    (retrained in place): nothing can use them again. Others' are kept (a run may switch back to them)."""
    for header in glob.glob(glob.escape(cache) + "-latents-*.json"):
        with contextlib.suppress(OSError, ValueError):
            with open(header) as f:
                head = json.load(f)
            src = head.get("source")
            if head.get("key") == key or not src:
                continue
            file = os.path.join(src, "ckpt.pt") if os.path.isdir(src) else src  # a folder means its ckpt.pt
            gone = not os.path.exists(file)
            if not gone:
                weights = torch.load(file, map_location="cpu", weights_only=True, mmap=True).get("ema", {})
                gone = f"{util.tensor_crc(weights):08x}" != head["key"]
            if gone:
                stem = header[:-len(".json")]
                for ext in (".bin", ".json"):
                    with contextlib.suppress(OSError):
                        os.remove(stem + ext)
                log(f"latents: removed {stem}.bin, the cache of an autoencoder that {src} no longer holds")


def encode_more(head, name, sel, order, size, crop, encode, flip, logvar, want, seconds, device, log, path,
                cache_dir, batch):
    """Encode the images of `order` from head['done'] on, until `want` rows are written or `seconds` have
    passed, into the cache's file; the header (rows, their CRC-32, the stats) is written after every window,
    so that a run stopped on the way keeps what it encoded. -> the header."""
    pixels = None  # the pixel cache and where each file is in it, when it is there or the split is small
    fresh = os.path.exists(cache_file(cache_dir or default_cache_dir(), path, "train", crop, size))
    if fresh or len(order) * 3 * size * size < SMALL_SPLIT:
        c = load(path, size, "train", crop, cache_dir, log=log, sel=sel)
        pixels = (c["images"], {f: i for i, f in enumerate(c["files"])})
    else:
        check_upscale(sel["files"], size, crop, len(order) * 3 * size * size)
    t0 = time.time()
    rows0 = head["rows"]
    what = "latents: encoding the images and their mirror images" if flip else "latents: encoding the images"
    progress = util.Progress(want, what, "images", log, every=5, first=True)
    out = None
    pool = None
    try:
        while head["rows"] < want and head["done"] < len(order) and time.time() - t0 < seconds:
            todo = order[head["done"]:head["done"] + WINDOW]
            files = [sel["files"][i] for i in todo]
            if pixels is not None:
                kept = [j for j, f in enumerate(files) if f in pixels[1]]
                images = pixels[0][[pixels[1][files[j]] for j in kept]]
            else:
                if pool is None:
                    pool = decoding_pool(len(order))
                images, kept = decode_window(files, size, crop, pool, log)
            encoded = 0  # of the window's kept images
            while encoded < len(kept) and head["rows"] < want and time.time() - t0 < seconds:
                pace = paced(batch, seconds, time.time() - t0, head["rows"] - rows0)
                b = min(batch, want - head["rows"], pace)
                x = to_float(images[encoded:encoded + b], device)
                rows = encoded_rows(encode, x, flip, logvar)  # (b, F, C or 2C, h, w) float16
                if out is None:
                    head["shape"] = list(rows.shape[1:])
                    out = latent_file(name, head)
                out[head["rows"]:head["rows"] + len(rows)] = rows
                head["crc"] = zlib.crc32(rows.numpy().tobytes(), head["crc"])
                head["stats"] = add_stats(head["stats"], rows, head["rows"], logvar)
                head["rows"] += len(rows)
                encoded += len(rows)
                progress(min(head["rows"], want))
            used = len(todo) if encoded == len(kept) else kept[encoded]  # the window's positions consumed
            head["skipped"] += [todo[j] for j in range(used) if j not in set(kept[:encoded])]
            head["done"] += used
            spent = head["seconds_per_row"] * rows0 + time.time() - t0  # this cache's encoding, in all runs
            head["seconds_per_row"] = spent / max(head["rows"], 1)
            write_header(name, head)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if head["rows"] < want:
        log(f"latents: {head['rows']:,} of the {len(order):,} images encoded in the {time.time() - t0:.0f} s "
            "this run gives it: it trains on those, a random part of the split (a later run continues the "
            "cache)")
    if out is not None:
        each = math.prod(head["shape"]) * LATENT_DTYPE.itemsize
        log(f"latents: cache {name}.bin: {util.plural(head['rows'], 'image')}, {each / 2**10:.1f} KiB each")
    return head


def paced(batch, seconds, spent, done):
    """The images of the next batch under a time allowance: 4 at first, then what about a twentieth of the
    allowance encodes at the rate so far (at most `batch`), so the encoding stops close to its end."""
    if math.isinf(seconds):
        return batch
    if done == 0:
        return 4
    return max(4, min(batch, int(done / max(spent, 1e-9) * seconds / 20)))


@torch.no_grad()
def encoded_rows(encode, x, flip, logvar):
    """(B, F, C or 2C, h, w) float16 on the CPU: the posterior mean (and log-variance) of each image of x (and
    of its mirror image, with `flip`)."""
    views = []
    for v in ([x, x.flip(3)] if flip else [x]):
        mean, lv = encode(v)
        views.append(torch.cat([mean, lv], dim=1) if logvar else mean)
    return torch.stack(views, dim=1).float().to(LATENT_DTYPE).cpu()


def add_stats(stats, rows, first, logvar):
    """The streaming (count, sum, sum of squares), float64, of view 0's latents: the means, or with `logvar` a
    sample of each posterior (its noise seeded by the rows' place). -> the stats with `rows` added."""
    z = rows[:, 0].double()
    if logvar:
        mean, lv = z.chunk(2, dim=1)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(first), dtype=torch.float64)
        z = mean + torch.exp(0.5 * lv) * noise
    return [stats[0] + z.numel(), stats[1] + z.sum().item(), stats[2] + (z * z).sum().item()]


def stats_of(head, n, latents, chunk=4096):
    """The stats of the first n rows: the header's when they are all its rows, else streamed again."""
    if n == head["rows"]:
        return tuple(head["stats"])
    stats = [0, 0.0, 0.0]
    for i in range(0, n, chunk):
        stats = add_stats(stats, latents[i:min(n, i + chunk)], i, head["logvar"])
    return tuple(stats)


def latent_file(name, head):
    """The cache's rows, memory-mapped: (slots, F, C', h, w) float16 in a file of the whole split's size
    (sparse: rows not written yet take no disk), made where it is missing."""
    numel = head["slots"] * math.prod(head["shape"])
    def make(tmp):
        with open(tmp, "wb") as f:
            f.truncate(numel * LATENT_DTYPE.itemsize)
    if not os.path.exists(name + ".bin"):  # (and its folder, the first time a cache is written there)
        util.atomic_write(make, name + ".bin", "cache folder")
    return torch.from_file(name + ".bin", shared=True, size=numel, dtype=LATENT_DTYPE).view(head["slots"],
                                                                                              *head["shape"])


def write_header(name, head):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(head, f)
    util.atomic_write(write, name + ".json", "cache folder")


def decoding_pool(n):
    """Processes that decode the images, one per core (fewer for few images)."""
    workers = min(os.cpu_count() or 1, max(1, n // 64))
    start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context(start), _worker_init)


def decode_window(files, size, crop, pool, log):
    """Decode `files` on the pool. -> ((k, 3, size, size) uint8 of those that could be read, their index)."""
    images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    kept = []
    try:
        for j, (img, err, _) in enumerate(pool.map(_preprocess_or_none, [(f, size, crop) for f in files],
                                                   chunksize=32)):
            if err:
                log(f"warning: skipped unreadable image {err}")
                continue
            images[len(kept)] = torch.frombuffer(bytearray(img), dtype=torch.uint8).view(3, size, size)
            kept.append(j)
    except concurrent.futures.process.BrokenProcessPool:
        raise DataError("a decoding process died (out of memory, or killed?); run again: the latents encoded "
                        "so far are kept")
    return images[:len(kept)], kept

# -----------------------------------------------------------------------------
# serving batches


class Batches:
    """Random training batches of the uint8 images, flipped on the device. Every rank draws the same
    permutation per epoch and takes its shard of each global batch: the same batches on any number of GPUs.
    `batch` makes a batch of the items drawn (LatentBatches: of latents)."""

    def __init__(self, images, batch_size, device, seed, rank=0, world=1, flip=True, attrs=None,
                 resident=None, caption=None):
        """resident: keep the images on the GPU (default: when fits_on_gpu says they fit). attrs: the
        condition of each image (its attributes, or a text model's tokens); caption(attrs of the global batch,
        step): a CelebA text model's new sentences of them at each step (text.Captions)."""
        if batch_size % world or len(images) < batch_size:
            raise ValueError(f"a batch of {batch_size} must divide into {world} equal shards and fit in the "
                             f"{len(images):,} images")
        device = torch.device(device)
        if resident is None:
            resident = fits_on_gpu(images.nbytes, device)
        if resident:
            images = images.to(device)  # GPU-resident: a batch is one gather, no host copies
        self.pin = device.type == "cuda" and not resident  # each batch pinned on its way, not the whole cache
        self.images = images
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.attrs = attrs.to(device) if attrs is not None else None  # (N, K) uint8 0/1, or (N, L) tokens
        self.caption = caption
        self.shard = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
        self.flip = flip
        self.perm_epoch = None
        self.steps_per_epoch = len(images) // batch_size  # the last partial batch of an epoch is dropped

    @property
    def shape(self):
        """(C, H, W) of what a batch holds."""
        return tuple(self.images.shape[1:])

    def get(self, step, generator):
        """This rank's shard of global batch `step`: ((B/world, C, H, W) in [-1, 1], (B/world, K) uint8
        attributes or None). `generator` (on the device) draws the flips."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if self.perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self.perm = torch.randperm(len(self.images), generator=g).to(self.images.device)
            self.perm_epoch = epoch
        idx = self.perm[i * self.batch_size:(i + 1) * self.batch_size][self.shard]
        flip = None
        if self.flip:
            flip = torch.rand(self.batch_size, generator=generator, device=self.device)[self.shard] < 0.5
        x = self.batch(idx, flip, generator)
        attrs = None
        if self.attrs is not None:
            attrs = self.condition(step, i, idx)
        return x, attrs

    def condition(self, step, i, idx):
        """The condition of the items idx of batch i of its epoch: their attributes or tokens, or a CelebA
        text run's new sentences of the global batch's attributes (this rank's shard kept)."""
        if self.caption is None:
            return self.attrs[idx.to(self.attrs.device)]
        rows = self.perm[i * self.batch_size:(i + 1) * self.batch_size]
        return self.caption(self.attrs[rows.to(self.attrs.device)], step)[self.shard].to(self.device)

    def gather(self, idx):
        """The items idx, on their way to the device (a host batch pinned for an asynchronous copy)."""
        items = self.images[idx]
        if self.pin:
            items = items.pin_memory()
        return items.to(self.device, non_blocking=True)

    def batch(self, idx, flip, generator):
        """The images idx in [-1, 1], those where `flip` is true mirrored."""
        x = to_float(self.gather(idx), self.device)
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


class LatentBatches(Batches):
    """Batches of an autoencoder's latents instead of images. `images` holds the posterior q(z | x) of each
    image and of its mirror image, (N, F, C, h, w) float16 (encode_latents'): F = 2 (or 1 without flips), the
    mean, and with `sample` the log-variance stacked after it (2C). A batch takes the mirror where the flip is
    drawn (an image flip, exactly), then the mean or, with `sample`, a sample of the posterior, times
    `scale`."""

    def __init__(self, images, batch_size, device, seed, rank=0, world=1, flip=True, attrs=None,
                 resident=None, scale=1.0, sample=False, caption=None):
        super().__init__(images, batch_size, device, seed, rank, world, flip and images.shape[1] == 2, attrs,
                         resident, caption)
        self.scale = scale
        self.sample = sample

    @property
    def shape(self):
        channels = self.images.shape[2] // 2 if self.sample else self.images.shape[2]
        return (channels, *self.images.shape[3:])

    def batch(self, idx, flip, generator):
        posterior = self.gather(idx).float()  # (b, F, C or 2C, h, w)
        if flip is None:
            posterior = posterior[:, 0]
        else:
            posterior = posterior[torch.arange(len(idx), device=self.device), flip.long()]
        z = posterior  # (b, C, h, w): the means
        if self.sample:  # the global batch's draw, this rank's shard: the same on any number of GPUs
            mean, logvar = posterior.chunk(2, dim=1)
            noise = torch.randn((self.batch_size, *mean.shape[1:]), generator=generator, device=self.device)
            z = mean + torch.exp(0.5 * logvar) * noise[self.shard]
        return z * self.scale


def fits_on_gpu(nbytes, device):
    """Whether `nbytes` of images live on `device`: a GPU, if they take under 30% of its free memory."""
    device = torch.device(device)
    return device.type == "cuda" and nbytes < 0.3 * torch.cuda.mem_get_info(device)[0]

# -----------------------------------------------------------------------------
# the download


DOWNLOAD_HELP = ("get CelebA by hand: img_align_celeba.zip ('Align&Cropped Images'), list_attr_celeba.txt "
                 "and list_eval_partition.txt from mmlab.ie.cuhk.edu.hk/projects/CelebA.html, unzipped as "
                 "PATH/celeba/img_align_celeba/*.jpg with the .txt files in PATH/celeba/, or Kaggle's "
                 "jessicali9530/celeba-dataset unzipped as is; then give PATH as the data folder")
NO_NETWORK = ("URLError", "ConnectionError", "ConnectTimeout", "gaierror", "timed out", "No route to host",
              "Network is unreachable", "Connection refused")
QUOTA = ("Too many users", "quota", "Cannot retrieve the public link", "FileURLRetrievalError")


def download(path, log=print):
    """torchvision's CelebA download (it needs gdown). A failure leaves no empty folder and raises a DataError
    that says why and how to get CelebA by hand."""
    if importlib.util.find_spec("gdown") is None:
        raise DataError("the CelebA download needs the gdown package, which torchvision uses for Google "
                        f"Drive: pip install gdown. Or {DOWNLOAD_HELP}")
    log(f"data: trying torchvision's CelebA download into {path} (about 1.4 GB; Google Drive often refuses "
        "with a quota error)")
    existed = os.path.exists(path)
    try:
        torchvision.datasets.CelebA(path, split="all", target_type="attr", download=True)
    except Exception as e:
        for folder in (os.path.join(path, "celeba"), path):  # the empty folders that were not there before
            if os.path.isdir(folder) and not os.listdir(folder) and (folder != path or not existed):
                os.rmdir(folder)
        chain = []  # the exception and what caused it
        while e is not None and len(chain) < 10:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ if e.__cause__ is not None else e.__context__
        text = " | ".join(chain)
        why = chain[0].splitlines()[0][:300]
        if any(k in text for k in NO_NETWORK):
            why = "no network: Google Drive could not be reached"
        if any(k in text for k in QUOTA):
            why = "Google Drive refused the file (its quota for CelebA is used up; this often lasts a day)"
        raise DataError(f"the CelebA download failed: {why}. Or {DOWNLOAD_HELP}")

# -----------------------------------------------------------------------------
# python data.py: check a data folder


def get_args(argv=None):
    p = util.Parser(description="Check a CelebA folder: layout, splits, cache, speed.")
    p.add_argument("--data", required=True, type=util.path, help="CelebA root (torchvision or Kaggle "
                   "layout) or any folder of images")
    p.add_argument("--size", type=util.positive(int), default=64, help="image size after crop and resize")
    p.add_argument("--split", default="train", choices=[*SPLITS, "all"], help="which split")
    p.add_argument("--crop", default="auto", choices=CROPS, help="auto: the DDIM box for 178x218 CelebA, "
                   "else a centre square; none squashes the whole frame")
    p.add_argument("--cache-dir", type=util.path, default=None, help="decoded images (default: "
                   "~/.cache/ddpm-faces)")
    p.add_argument("--preview", default="data_preview.png", help="a grid of 64 preprocessed images ('': "
                   "none)")
    p.add_argument("--export", type=util.path, default=None, metavar="DIR", help="also write every "
                   "preprocessed image as a PNG into DIR (real images for a face score)")
    p.add_argument("--download", action="store_true", help="first try torchvision's CelebA download")
    return p.parse_args(argv)


def summary(d, args, loaded):
    """What was loaded, and how fast."""
    labels = f"{len(d['attr_names'])} attributes" if d["attrs"] is not None else "no labels"
    print(f"layout:  {d['layout']} ({d['image_dir']})\nimages:  {len(d['files']):,} in split {args.split}, "
          f"{labels}")
    if d["partition"]:  # the split of each image on disk
        _, part = _read_table(d["partition"])
        on_disk = {os.path.basename(f) for f in list_images(d["image_dir"])}
        n = collections.Counter(_ints(d["partition"], r)[0] for name, r in part.items() if name in on_disk)
        print("splits:  " + ", ".join(f"{s} {n[k]:,}" for s, k in SPLITS.items()) + " (official partition)")
    try:  # what a text model would read
        found = captions(dict(d, split=args.split))
    except DataError as e:
        found = None
        print(f"text:    the captions cannot be used: {e}")
    if found is not None:
        where = ".txt files"
        if os.path.isfile(os.path.join(d["image_dir"], "metadata.jsonl")):
            where = "metadata.jsonl"
        print(f"text:    {len(found):,} captions ({where}), e.g. {found[0]!r}")
    print(f"cache:   {d['cache']} ({d['images'].numel() / 2**20:,.1f} MiB)")
    seconds = d["decode_seconds"]
    print(f"decode:  {len(d['files']) / seconds:,.0f} img/s" if seconds else
          f"decode:  cached, loaded in {loaded:.1f}s")
    b = 128  # serving: training batches from the cache, on the GPU if there is one
    if len(d["images"]) >= b:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        batches = Batches(d["images"], b, device, 0)
        g = torch.Generator(device)
        n = 0  # batches served
        t1 = None  # when the first was
        while n < 10 or time.time() - t1 < 2:
            batches.get(n, g)
            t1, n = t1 or time.time(), n + 1  # the first batch (the permutation) is not timed
        budget.synchronize(torch.device(device))
        print(f"serve:   {(n - 1) * b / (time.time() - t1):,.0f} img/s in batches of {b} on {device}")


def main(argv=None):
    args = get_args(argv)
    with util.one_line_errors((OSError, DataError, util.UsageError, util.WriteError),
                              "interrupted: nothing was cached; run again to decode"):
        util.stop_on_signals()
        if args.export:
            util.check_writable(args.export, "--export")
        if args.download:
            download(args.data)
        t0 = time.time()
        d = load(args.data, args.size, args.split, args.crop, args.cache_dir)
        summary(d, args, time.time() - t0)
        if args.preview:  # at most 256 px a face: a grid of full-size images of a large --size would not fit
            preview = d["images"][:64]
            if args.size > 256:
                preview = TF.resize(preview, [256, 256], antialias=True)
            util.save_image(preview, args.preview, "--preview", nrow=8, padding=2)
            print(f"preview: {args.preview}")
        if args.export:  # each file whole or not at all: a full disk stops the export with an error
            for f, img in zip(d["files"], d["images"]):
                name = os.path.splitext(os.path.basename(f))[0] + ".png"
                util.write_png(img, os.path.join(args.export, name), "--export")
            print(f"export:  {len(d['files']):,} PNGs in {args.export}")


if __name__ == "__main__":
    main()
