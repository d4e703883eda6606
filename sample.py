"""
Draw faces from a checkpoint written by train.py. The checkpoint alone rebuilds the model (EMA weights).
This file needs only unet.py and diffusion.py beside it; train.py imports its checkpoint helpers.

    python sample.py out/ckpt.pt                              # 64 faces -> samples.png
    python sample.py out/ckpt.pt --n 10000 --out-dir fid_gen  # numbered PNGs for FID tools
    python sample.py out/ckpt.pt --sampler ddpm               # 1000-step ancestral sampling
    python sample.py --bench --compile                        # images/s of 50-step DDIM, random weights
"""
import argparse
import contextlib
import csv
import math
import os
import sys
import tempfile
import time
import warnings

import torch
import torchvision
from PIL import Image, ImageDraw
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as TF

import unet
from diffusion import SCHEDULES, GaussianDiffusion, guided, slerp

CKPT_FORMAT = "ddpm-faces-checkpoint-v1"
# the default sampler: the best face quality per model evaluation measured so far (README, "Choosing a sampler")
SAMPLERS = ("ddim", "dpm++", "dpm++sde", "ddpm")
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_ETA = "ddim", 20, 1.0
DEFAULT_GUIDANCE = 3.0  # classifier-free guidance weight: the largest measured whose face quality stays within 10% (README, "Faces on request")
FIGURES = ("forward", "reverse", "schedules", "loss")
FORWARD_T = (0, 50, 100, 250, 500, 750, 999)  # the forward strip's timesteps at T = 1000 (scaled for other T)
REPAINT_STEPS = 250  # RePaint's face setting: 250 steps, jump length 10, 10 resamplings
# --mask regions as (top, bottom, left, right) fractions of the image, filled in by the model; eyes and mouth are placed
# for aligned CelebA faces, under the DDIM crop and the whole frame alike
MASKS = dict(center=(0.25, 0.75, 0.25, 0.75), top=(0, 0.5, 0, 1), bottom=(0.5, 1, 0, 1), left=(0, 1, 0, 0.5),
             right=(0, 1, 0.5, 1), eyes=(0.33, 0.57, 0.15, 0.85), mouth=(0.62, 0.84, 0.28, 0.72))
CROPS = ("auto", "celeba", "center", "none")
# The crop of the DDIM CelebA-64 reference: a 128x128 box centred at (x=89, y=121) of the 178x218 image.
CELEBA_W, CELEBA_H, CELEBA_CX, CELEBA_CY, CELEBA_SIDE = 178, 218, 89, 121, 128
warnings.filterwarnings("ignore", message=".*TorchCodec.*")  # torchvision 0.29 deprecates its image codecs; they still work

# -----------------------------------------------------------------------------
# errors the user can fix: each is printed as one line, with exit code 2


class UsageError(Exception):
    """A bad flag or path: the message names it and the fix."""


class CheckpointError(Exception):
    """A missing, corrupt or foreign checkpoint."""


class WriteError(Exception):
    """A file could not be written (disk full, read-only, quota): the message names the file and the flag."""


USER_ERRORS = (UsageError, CheckpointError, WriteError)


# argparse types; argparse names a value it cannot convert by the type's __name__ ("invalid integer value: 'x'")
def real(s):
    """argparse type: a finite float (float() alone also takes 'nan' and 'inf')."""
    v = float(s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
    return v
real.__name__ = "number"


def positive(kind):
    """argparse type: a finite number > 0."""
    def parse(s):
        v = real(s) if kind is float else kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    parse.__name__ = "positive integer" if kind is int else "positive number"
    return parse


def non_negative(s):
    """argparse type: an integer >= 0 (0 usually means never)."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v
non_negative.__name__ = "integer"


def random_seed(s):
    """argparse type: a seed in 0..2^63-1 (what torch's generators take, with room for the per-step offsets)."""
    v = int(s)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"must be in 0..2^63-1, got {s}")
    return v
random_seed.__name__ = "integer"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' once, and not at all where the default is None or False (the help says it)."""
    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with HelpFormatter, whose errors are one line (the usage is what -h prints)."""
    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message):
        if "expected one argument" in message:  # e.g. --ch-mult -1,2: argparse takes '-1,2' for a flag
            message += " (a value that starts with '-' is written --flag=VALUE)"
        self.exit(2, f"error: {message} (python {self.prog} -h lists the flags)\n")


def pick_device(name, local_rank=0, local_world=1):
    """--device -> torch.device: the first available of cuda, mps, cpu when name is None. Under torchrun, process
    `local_rank` of the `local_world` on this machine takes GPU local_rank."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device; use cuda, cuda:N, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if device.type == "cuda" and max(local_world, (device.index or 0) + 1) > torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UsageError(f"{max(local_world, (device.index or 0) + 1)} processes want a GPU each but {n} GPU{'s are' if n > 1 else ' is'} "
                         f"visible; start torchrun with --nproc_per_node={n} (or fewer), or use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def autocast(device, precision):
    """--precision -> (its name, the autocast context). auto: bf16 on GPUs with native bf16 (Ampere and later),
    fp16 on older GPUs (is_bf16_supported() alone also counts the slow emulated bf16 of a V100 or T4), fp32 on
    CPU and MPS. fp32 means fp32: TF32 matmuls and convolutions only come with the mixed precisions."""
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    return precision, contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def synchronize(device):
    """Wait for the device's queued work, so that a timing measures it (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def why(e):
    """A short reason for a failed write: the OS's words when there are some."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return "the write failed part-way: disk full or over quota?"


def check_writable(folder, flag):
    """Write a scratch file in `folder`, so that a bad output path fails before any work. Folders it had to
    create for that are removed again: a run that fails to start leaves nothing behind."""
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
        raise WriteError(f"{flag} {folder}: cannot write there ({why(e)}); pass a writable folder")
    finally:
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                os.rmdir(d)


def atomic_write(write, path, flag):
    """write(tmp_path), then rename over `path`: a failure at any point leaves `path` as it was and no
    temporary file behind, and raises WriteError naming the file and the flag. The folder is created if needed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WriteError(f"cannot write {path} ({why(e)}); free some space or pass another {flag}")


def remove_stale_temporaries(folder):
    """Delete the temporary files (NAME.tmpPID) that atomic_write left in `folder` when its process was killed
    mid-write (kill -9, a second Ctrl-C): those whose process is gone. -> how many were removed."""
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


def save_checkpoint(obj, path, flag="--out"):
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
    atomic_write(write, path, flag)


def load_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt and foreign files.
    A folder is taken to mean the ckpt.pt inside it."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "ckpt.pt")):
            raise CheckpointError(f"{path} is a folder without a ckpt.pt; pass the checkpoint file that train.py wrote")
        path = os.path.join(path, "ckpt.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; pass the ckpt.pt that train.py wrote (in its --out folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "GLOBAL" in str(e):  # weights_only met a reference to Python code: the file could run it if loaded
            raise CheckpointError(f"{path} was refused as unsafe: it refers to Python objects ({str(e).split('GLOBAL ')[-1].split()[0]}) "
                                  "that a checkpoint of this project never holds and that could run code when loaded; use a ckpt.pt "
                                  "written by train.py")
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated? {type(e).__name__}); "
                              "use another checkpoint or retrain")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} was not written by this project's train.py (no '{CKPT_FORMAT}' marker); "
                              "pass a ckpt.pt from train.py's --out folder")
    for part in ("model", "ema"):
        weights = ckpt.get(part)
        if isinstance(weights, dict) and not all(torch.isfinite(v).all() for v in weights.values() if torch.is_tensor(v) and v.is_floating_point()):
            raise CheckpointError(f"{path}: its {'EMA ' if part == 'ema' else ''}weights are not finite (NaN or inf), so every image "
                                  "would be blank; the run diverged before this was saved: use an earlier checkpoint or retrain")
    return ckpt


def model_from_checkpoint(ckpt, path, weights="ema", device="cpu"):
    """-> (UNet with the checkpoint's `weights`, the EMA ones by default; GaussianDiffusion) as the checkpoint
    describes them. On the meta device: a check, at no cost, that the config and the weights fit together."""
    try:
        with torch.device(device):
            model = unet.build(ckpt["model_args"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # on the meta device the copy is a no-op: only keys and shapes are checked
            model.load_state_dict(ckpt[weights])
        a = ckpt["args"]
        return model, GaussianDiffusion(a["timesteps"], a["schedule"], a["objective"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match this version of unet.py ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


# -----------------------------------------------------------------------------
# images in: the training preprocessing (data.py uses it too), so that an --init image is what the model saw

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


def _decode(path):
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
    img = _decode(path)
    left, top, w, h = crop_box(img.shape[2], img.shape[1], crop)
    img = TF.crop(img, top, left, h, w)
    return TF.resize(img, [size, size], antialias=True)


def image_formats():
    """File extensions Pillow can write, e.g. {'.png', '.jpg', ...}."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}

# -----------------------------------------------------------------------------


def get_args(argv=None):
    p = Parser(description="Sample faces from a train.py checkpoint.")
    p.add_argument("ckpt", nargs="?", default=None, help="checkpoint path (out/ckpt.pt, or the out folder); not needed with --bench")
    p.add_argument("--n", type=positive(int), default=64, help="number of images")
    p.add_argument("--batch-size", type=positive(int), default=256, help="images per forward pass")
    p.add_argument("--sampler", default=None, choices=SAMPLERS,
                   help=f"DDIM, DPM-Solver++(2M) (second-order ODE solver), SDE-DPM-Solver++(2M) (its stochastic twin) or DDPM "
                        f"ancestral (all T steps) (default: {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=positive(int), default=None,
                   help=f"model evaluations for ddim and dpm++ (ddpm uses all T); with --mask, RePaint's steps down the sub-sequence "
                        f"(default: {DEFAULT_STEPS}, with --mask {REPAINT_STEPS})")
    p.add_argument("--spacing", default=None, choices=["logsnr", "time"],
                   help="dpm++ and dpm++sde time steps: uniform in log-SNR or in t (default: logsnr)")
    p.add_argument("--eta", type=real, default=None, help=f"DDIM eta: 0 deterministic, 1 DDPM-like noise (default: {DEFAULT_ETA:g})")
    p.add_argument("--var", default=None, choices=["beta", "posterior"],
                   help="ddpm's sigma_t^2: beta_t or the posterior variance (default: beta)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--seed", type=random_seed, default=0, help="random seed: the same seed gives the same faces")
    p.add_argument("--out", default="samples.png", help="grid image to write (.png, .jpg, .webp, ...)")
    p.add_argument("--out-dir", default=None, help="also write every image as a numbered PNG here (for pytorch-fid / clean-fid)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision; auto = bf16 on GPUs with native bf16, fp16 on older GPUs, fp32 on CPU/MPS")
    p.add_argument("--compile", action="store_true", help="torch.compile the sampling step (CUDA graphs on GPU)")
    p.add_argument("--init", default=None, help="SDEdit: edit this image (cropped and resized as in training) instead of sampling from noise")
    p.add_argument("--strength", type=real, default=None, help="SDEdit: noise --init to t = strength * T, then denoise; in [0, 1] "
                   "(0 returns the image, 1 ignores it; default 0.5, the SDEdit paper's range)")
    p.add_argument("--crop", default="auto", choices=CROPS, help="how --init is cropped, as train.py's --crop")
    p.add_argument("--interpolate", type=positive(int), default=None, metavar="FRAMES",
                   help="a strip of FRAMES faces from --seed's starting noise to --seed + 1's (spherical interpolation), "
                        "with a deterministic sampler (DDIM eta 0 unless --sampler dpm++)")
    p.add_argument("--attrs", default=None, metavar="NAME=0|1,...",
                   help="ask a model trained with --attrs for attributes, e.g. 'Smiling=1,Eyeglasses=0' (1 present, 0 absent); "
                        "the others are left free")
    p.add_argument("--guidance", type=real, default=None,
                   help=f"classifier-free guidance weight W for --attrs/--compare: 1 the conditional model alone, larger follows the "
                        f"attributes more strictly at some cost in variety (default: {DEFAULT_GUIDANCE:g})")
    p.add_argument("--compare", default=None, metavar="NAME",
                   help="side by side: every face with attribute NAME absent (top row) and present (bottom row), from the same noise")
    p.add_argument("--mask", default=None, metavar="REGION|MASK.png",
                   help=f"inpaint --init with RePaint: the model fills in {', '.join(MASKS)}, or the white pixels of a mask image "
                        "(cropped and resized like --init)")
    p.add_argument("--jump-length", type=positive(int), default=None, help="RePaint: steps the chain goes back up per resampling (default: 10)")
    p.add_argument("--jump-n-sample", type=positive(int), default=None,
                   help="RePaint: passes over each jump, so 1 is no resampling (default: 10)")
    p.add_argument("--figure", default=None, choices=FIGURES,
                   help="instead of samples, write a figure to --out: forward (one face noised under each schedule; the face is "
                        "--init or the model's own), reverse (x_t and predicted x0 along the sampler for up to 8 faces, and a GIF "
                        "of every step beside --out), schedules (alpha_bar and log-SNR against t), loss (the run's log.csv)")
    p.add_argument("--bench", action="store_true", help="time sampling with a randomly initialised model of --size")
    p.add_argument("--size", type=positive(int), default=None, help="image size for --bench, whose preset model it times (default: 64)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except USER_ERRORS as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_outputs(args):
    """Every output path is checked before sampling, so that a bad one loses no work."""
    if not args.bench:
        if os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a folder; give an image file name such as {os.path.join(args.out, 'samples.png')}")
        ext = os.path.splitext(args.out)[1].lower()
        if ext not in image_formats():
            raise UsageError(f"--out {args.out}: '{ext or 'no extension'}' is not an image format Pillow writes; use .png, .jpg or .webp")
        check_writable(os.path.dirname(args.out), "--out")
        remove_stale_temporaries(os.path.dirname(args.out) or ".")
    if args.out_dir:
        check_writable(args.out_dir, "--out-dir")
        remove_stale_temporaries(args.out_dir)


def check_modes(args):
    """Flags that do not fit together, or values out of range: one line each, before any work. Fills in the
    defaults that depend on the mode (--steps, --sampler, --strength, RePaint's jumps, --guidance)."""
    repaint = [f for f in ("jump_length", "jump_n_sample") if getattr(args, f) is not None]
    if args.figure and (args.interpolate or args.compare or args.mask or args.strength is not None or args.bench):
        raise UsageError("--figure draws one figure; drop --interpolate, --compare, --mask, --strength and --bench")
    if args.figure and args.init is not None and args.figure != "forward":
        raise UsageError(f"--init is the face of --figure forward; --figure {args.figure} draws its own")
    check_sampler_flags(args)
    if args.bench:
        args.size = args.size or 64
        try:
            unet.check_config(unet.preset(args.size))
        except ValueError as e:
            raise UsageError(f"--size {args.size}: {e}")
    elif args.size is not None:
        raise UsageError("--size sets the model that --bench times; a checkpoint has its own size: drop --size")
    if args.figure == "reverse" and args.n > 8:
        raise UsageError(f"--figure reverse draws up to 8 faces, each as two rows; use --n 8 or fewer (not {args.n})")
    if args.attrs is not None and not args.attrs.strip(", "):
        raise UsageError("--attrs '': ask for attributes as NAME=1 or NAME=0, e.g. --attrs Smiling=1; drop --attrs for "
                         "faces with every attribute left free")
    if (args.strength is not None or args.mask is not None) and args.init is None:
        raise UsageError(f"{'--mask' if args.mask is not None else '--strength'} edits an image: give the image with --init IMAGE")
    if repaint and args.mask is None:
        raise UsageError(f"--{repaint[0].replace('_', '-')} sets RePaint's resampling, which inpaints: add --init IMAGE --mask REGION")
    if args.mask is not None:
        if args.strength is not None:
            raise UsageError("--mask (inpainting) and --strength (SDEdit) do not go together; use one of them")
        if args.sampler is not None:
            raise UsageError(f"--mask samples with RePaint's own ancestral steps, not --sampler {args.sampler}; drop --sampler")
        if args.mask not in MASKS and not os.path.isfile(args.mask):
            raise UsageError(f"--mask {args.mask}: neither a region ({', '.join(MASKS)}) nor an image file; give one of them")
        args.jump_length, args.jump_n_sample = args.jump_length or 10, args.jump_n_sample or 10
    args.sampler = args.sampler or DEFAULT_SAMPLER
    if args.mask is None:
        args.steps = args.steps or DEFAULT_STEPS  # with --mask: RePaint's 250, or T if less, once T is known
    if args.init is not None:
        if args.mask is None and not args.figure:
            args.strength = 0.5 if args.strength is None else args.strength
        if args.strength is not None and not 0 <= args.strength <= 1:
            raise UsageError(f"--strength {args.strength}: must be in [0, 1] (0 returns the image, 1 ignores it; about 0.5 edits it)")
        if not os.path.isfile(args.init):
            raise UsageError(f"--init {args.init}: no such file; give an image file (.jpg, .png, ...)")
    if args.guidance is not None and args.attrs is None and args.compare is None:
        raise UsageError("--guidance weighs the attributes asked for: add --attrs NAME=1 (or --compare NAME)")
    args.guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    if args.guidance < 0:
        raise UsageError(f"--guidance {args.guidance}: must be >= 0 (0 ignores the attributes, 1 is the conditional model)")
    if args.interpolate:
        if args.interpolate < 2:
            raise UsageError(f"--interpolate {args.interpolate}: a strip needs at least 2 frames (the two seeds' faces)")
        if args.init is not None or args.compare is not None:
            raise UsageError(f"--interpolate and {'--init' if args.init is not None else '--compare'} do not go together; use one of them")
        if args.sampler in ("ddpm", "dpm++sde"):
            raise UsageError(f"--interpolate needs a deterministic sampler, and {args.sampler} adds noise: use --sampler ddim or dpm++")
        if args.sampler == "ddim" and args.eta != 0:
            print("--interpolate: DDIM with eta 0, so that every frame is a function of its starting noise alone")
            args.eta = 0.0


def check_sampler_flags(args):
    """--eta, --var, --spacing and --steps each apply to some samplers only: given to another, they are an error
    (rather than silently ignored). Fills in their defaults."""
    sampler = "RePaint (--mask)" if args.mask is not None else args.sampler or DEFAULT_SAMPLER
    for flag, samplers in (("eta", ("ddim",)), ("var", ("ddpm",)), ("spacing", ("dpm++", "dpm++sde"))):
        if getattr(args, flag) is not None and sampler not in samplers:
            raise UsageError(f"--{flag} applies to --sampler {' and '.join(samplers)}, not {sampler}; drop --{flag}")
    if args.steps is not None and sampler == "ddpm":
        raise UsageError("--sampler ddpm takes all T steps, so --steps does not apply; for fewer stochastic steps use --sampler ddim --eta 1")
    args.eta = DEFAULT_ETA if args.eta is None else args.eta
    args.var, args.spacing = args.var or "beta", args.spacing or "logsnr"
    if not 0 <= args.eta <= 1:
        raise UsageError(f"--eta {args.eta:g}: must be in [0, 1] (0 deterministic, 1 DDPM-like); above 1 DDIM would add more "
                         "noise per step than the chain can take, and every pixel ends at 0 or 255")


def parse_attrs(args, model):
    """--attrs 'Smiling=1,Eyeglasses=0' and --compare -> (K,) float in {+1, -1, 0}, or None: the model's unconditional path."""
    if args.attrs is None and args.compare is None:
        return None
    names = list(model.cfg.attrs)
    flag = "--attrs" if args.attrs is not None else "--compare"
    if not names:
        raise UsageError(f"{flag}: {args.ckpt} is an unconditional model (trained without --attrs); train one with "
                         "python train.py --attrs Smiling,Male,... or drop the flag")
    cond = torch.zeros(len(names))
    for item in (args.attrs or "").split(","):
        if not item.strip():
            continue
        name, _, value = item.partition("=")
        if name.strip() not in names:
            raise UsageError(f"--attrs: the model has no attribute {name.strip()!r}; it knows {','.join(names)}")
        if value.strip() not in ("0", "1"):
            raise UsageError(f"--attrs {item.strip()}: write NAME=1 (present) or NAME=0 (absent)")
        if cond[names.index(name.strip())] != 0:
            raise UsageError(f"--attrs names {name.strip()} twice; give each attribute once")
        cond[names.index(name.strip())] = 1.0 if value.strip() == "1" else -1.0
    if args.compare is not None:
        if args.compare not in names:
            raise UsageError(f"--compare: the model has no attribute {args.compare!r}; it knows {','.join(names)}")
        if cond[names.index(args.compare)] != 0:
            raise UsageError(f"--compare {args.compare} shows it absent and present; do not also set it in --attrs")
    return cond


def load_mask(args, size, device):
    """--mask -> (1, 1, size, size): 1 where --init is kept, 0 where the model fills in."""
    if args.mask in MASKS:
        top, bottom, left, right = (round(f * size) for f in MASKS[args.mask])
        fill = torch.zeros(size, size)
        fill[top:bottom, left:right] = 1
    else:
        try:
            fill = (preprocess(args.mask, size, args.crop).float().mean(0) > 127.5).float()  # white: fill in
        except Exception as e:
            raise UsageError(f"--mask {args.mask}: not an image that can be read ({type(e).__name__}); give a .png whose white pixels are filled in")
        if fill.sum() == 0:
            raise UsageError(f"--mask {args.mask}: has no white pixels, so nothing would be filled in; paint the region white")
        sizes = [Image.open(f).size for f in (args.mask, args.init)]
        if sizes[0] != sizes[1]:
            print(f"note: --mask {args.mask} is {sizes[0][0]}x{sizes[0][1]} and --init {args.init} {sizes[1][0]}x{sizes[1][1]}; "
                  f"each is cropped and resized to {size}x{size} on its own, so the mask lines up only if it was drawn on the same frame")
    return (1 - fill).view(1, 1, size, size).to(device)


def load_model(args, device):
    """-> (model, diffusion, image size): the checkpoint's EMA model, or a random preset model for --bench."""
    if args.bench:
        return unet.UNet(unet.preset(args.size)), GaussianDiffusion(), args.size  # its size was checked in check_modes
    if args.ckpt is None:
        raise UsageError("no checkpoint given; usage: python sample.py out/ckpt.pt")
    ckpt = load_checkpoint(args.ckpt)
    model, diffusion = model_from_checkpoint(ckpt, args.ckpt)
    size = model.cfg.image_size
    print(f"loaded {args.ckpt}: step {ckpt['step']}, {model.num_params() / 1e6:.2f}M parameters, {size}x{size}, "
          f"T={diffusion.T} {diffusion.schedule} {diffusion.objective}")
    return model, diffusion, size


def load_init(args, size, device):
    """--init -> (1, 3, size, size) in [-1, 1], through the training preprocessing (crop, antialiased resize)."""
    try:
        img = preprocess(args.init, size, args.crop)
    except Exception as e:
        raise UsageError(f"--init {args.init}: not an image that can be read ({type(e).__name__}); give a .jpg or .png")
    return (img.float() / 127.5 - 1).unsqueeze(0).to(device)


def run(args):
    device = pick_device(args.device)
    check_modes(args)
    check_outputs(args)
    args.precision, ctx = autocast(device, args.precision)
    torch.backends.cudnn.benchmark = True
    if args.figure in ("schedules", "loss"):  # no model needed
        return figure_schedules(args) if args.figure == "schedules" else figure_loss(args)
    model, diffusion, size = load_model(args, device)
    args.steps = args.steps or min(REPAINT_STEPS, diffusion.T)
    if (args.sampler != "ddpm" or args.mask) and args.steps > diffusion.T:
        raise UsageError(f"--steps {args.steps} is more than the model's T={diffusion.T}; use at most {diffusion.T}")
    cond = parse_attrs(args, model)
    x_init = load_init(args, size, device) if args.init else None
    mask = load_mask(args, size, device) if args.mask else None
    model = model.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    diffusion.to(device)
    net = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default") if args.compile else model
    describe(args, diffusion, device, cond is not None)

    gen = torch.Generator(device=device).manual_seed(args.seed)
    def draw(n, x_T=None, attrs=cond, keep=()):
        """n images (n, 3, H, W) uint8 in the chosen mode, from x_T when given; with `keep`, also the frames
        (t, x_t, x0_hat) of plain sampling at those t."""
        fn = net if attrs is None else guided(net, attrs.to(device), args.guidance)  # two forward halves in one batch
        kw = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, generator=gen, clip=not args.no_clip,
                  var_type=args.var, device=device, spacing=args.spacing)
        shape = (n, 3, size, size)
        with ctx:
            if mask is not None:  # every image inpaints the same --init from its own noise
                x = diffusion.repaint(fn, x_init.expand(n, -1, -1, -1), mask, args.steps, args.jump_length, args.jump_n_sample,
                                      gen, not args.no_clip, x_T)
            elif x_init is not None:  # every image edits the same --init from its own noise
                noise = torch.randn(shape, generator=gen, device=device) if x_T is None else x_T
                x = diffusion.sdedit(fn, x_init.expand(n, -1, -1, -1), args.strength, noise, **kw)
            else:
                x = diffusion.sample(fn, shape, x_T=x_T, keep=keep, **kw)
        return (to_uint8(x[0]), x[1]) if keep else to_uint8(x)

    if args.bench:
        return bench(args, draw, device, size, len(sampler_steps(args, diffusion)))
    if args.figure == "forward":
        face = x_init if x_init is not None else draw(1).to(device).float() / 127.5 - 1
        return figure_forward(args, face, diffusion.T, device)
    if args.figure == "reverse":
        x_T = torch.randn((min(args.n, 8), 3, size, size), generator=gen, device=device)
        return figure_reverse(args, draw, sampler_steps(args, diffusion), x_T)
    if args.interpolate:  # frame 0 is --seed's own sample (the same x_T), the last frame --seed + 1's
        z = [torch.randn((1, 3, size, size), generator=torch.Generator(device=device).manual_seed(s), device=device)
             for s in (args.seed, args.seed + 1)]
        x = draw(args.interpolate, slerp(z[0], z[1], torch.linspace(0, 1, args.interpolate)))
        return write_images(args, [x], nrow=args.interpolate)
    if args.compare:  # the same x_T and, re-seeding the generator, the same noise at every step
        k, halves = list(model.cfg.attrs).index(args.compare), []
        x_T = torch.randn((args.n, 3, size, size), generator=gen, device=device)
        for value in (-1.0, 1.0):
            gen.manual_seed(args.seed + 1)
            halves.append(draw(args.n, x_T, cond.index_fill(0, torch.tensor([k]), value)))
        return write_images(args, halves, nrow=args.n)
    images, t0, done = [] if x_init is None else [to_uint8(x_init if mask is None else x_init * mask)], time.time(), 0
    while done < args.n:  # the grid starts with the --init image (its hole grey with --mask); the PNGs are the samples
        x = draw(min(args.batch_size, args.n - done))
        if len(images) * args.batch_size < 1024:  # the grid shows the first images only
            images.append(x)
        write_images(args, [x], first=done, grid=False)
        done += len(x)
        print(f"{done}/{args.n} images | {done / (time.time() - t0):,.2f} images/s")
    write_images(args, images, pngs=False)


def to_uint8(x):
    """[-1, 1] -> (n, 3, H, W) uint8 on the CPU."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def sampler_steps(args, diffusion):
    """The timesteps the sampler evaluates the model at."""
    if args.sampler == "ddpm":
        return range(diffusion.T)
    return diffusion.ddim_timesteps(args.steps) if args.sampler == "ddim" else diffusion.dpm_timesteps(args.steps, args.spacing)


def describe(args, diffusion, device, conditional):
    """The one line that says what will be drawn, and how."""
    if args.mask:
        path = diffusion.repaint_path(args.steps, args.jump_length, args.jump_n_sample)
        n = sum(q < p for p, q in zip(path, path[1:]))  # each step down is one model evaluation
        how = (f"RePaint inpainting of {args.init} ({args.mask}) with {args.steps} steps, jump length {args.jump_length}, "
               f"{args.jump_n_sample} passes: {n} model evaluations per image")
    else:
        how = f"{args.sampler} with {len(sampler_steps(args, diffusion))} steps" + (f", eta {args.eta}" if args.sampler == "ddim" else "")
        how += f"; SDEdit of {args.init} from t = {round(args.strength * diffusion.T)} of {diffusion.T}" if args.strength is not None else ""
    if conditional:
        asked = [a for a in (args.attrs, args.compare and f"{args.compare}=0|1") if a]
        how += f"; {' and '.join(asked)} with guidance {args.guidance:g}"
    print(f"device {device}, {args.precision}, {how}")


def bench(args, draw, device, size, steps):
    """Images/s of the chosen sampler. The warm-up runs the timed batch size through a 2-step chain, so that
    compilation, CUDA graphs and cuDNN's autotuning for these shapes all happen before the clock starts."""
    timed_steps, args.steps = args.steps, min(args.steps, 2)
    draw(args.batch_size)  # warm-up
    args.steps = timed_steps
    synchronize(device)
    t0 = time.time()
    draw(args.batch_size)
    synchronize(device)
    dt = time.time() - t0
    print(f"bench: {args.batch_size / dt:,.1f} images/s | {args.batch_size} images of {size}x{size} in {dt:.2f}s | "
          f"{args.sampler} {steps} steps | {dt / steps * 1e3:.1f} ms per step")


# -----------------------------------------------------------------------------
# figures: the forward and reverse process, the schedules, the loss curve (Pillow draws the few charts)


def face_grid(rows, col_labels, row_labels, scale):
    """rows: list of (k, 3, H, W) uint8 -> a PIL image, the faces enlarged `scale` times (nearest), labelled."""
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=len(rows[0]), padding=2, pad_value=255)  # (3, h, w)
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
    """Round tick values in [lo, hi]: multiples of 1, 2 or 5 times a power of ten (on a log axis, those values themselves)."""
    if log:
        ticks = [m * 10 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
        if len([v for v in ticks if lo <= v <= hi]) >= 3:
            return [v for v in ticks if lo <= v <= hi]
    raw = (hi - lo) / 5 or 1
    step = min(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** math.floor(math.log10(raw)) >= raw)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def line_chart(series, title, xlabel, log_y=False, size=(360, 260)):
    """series: list of (name, xs, ys) -> a PIL line chart with axes, round ticks and a legend."""
    W, H, (l, r, t, b) = *size, (52, 10, 22, 34)  # plot area margins: left, right, top, bottom
    f = math.log10 if log_y else (lambda y: y)
    xs = [x for _, xx, _ in series for x in xx]
    ys = [y for _, _, yy in series for y in yy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = 0.05 * ((f(y1) - f(y0)) or 1)
    px = lambda x: l + (x - x0) / ((x1 - x0) or 1) * (W - l - r)
    py = lambda y: H - b - (f(y) - f(y0) + pad) / (f(y1) - f(y0) + 2 * pad) * (H - t - b)
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([l, t, W - r, H - b], outline="black")
    for xv in nice_ticks(x0, x1):
        d.text((px(xv), H - b + 4), f"{xv:g}", fill="black", anchor="mt")
    unf = (lambda v: 10 ** v) if log_y else (lambda v: v)
    for yv in nice_ticks(unf(f(y0) - pad), unf(f(y1) + pad), log_y):
        d.line([l - 3, py(yv), l, py(yv)], fill="black")
        d.text((l - 5, py(yv)), f"{yv:.4g}", fill="black", anchor="rm")
    d.text((W / 2, 4), title, fill="black", anchor="mt")
    d.text(((l + W - r) / 2, H - 4), xlabel, fill="black", anchor="mb")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    for i, (name, xx, yy) in enumerate(series):
        points = [(px(x), py(y)) for x, y in zip(xx, yy)]
        d.line(points, fill=colours[i % 4], width=2) if len(points) > 1 else d.ellipse([*points[0], *points[0]], outline=colours[i % 4])
        d.text((W - r - 6, t + 6 + 12 * i), name, fill=colours[i % 4], anchor="ra")
    return img


def save_figure(args, img, path=None, **kw):
    fmt = Image.registered_extensions()[os.path.splitext(path or args.out)[1].lower()]
    atomic_write(lambda tmp: img.save(tmp, format=fmt, **kw), path or args.out, "--out")
    print(f"wrote {path or args.out}")


def figure_forward(args, face, T, device):
    """One face (1, 3, H, W) in [-1, 1] under q(x_t | x_0) at FORWARD_T, a row per schedule, the same noise in every row."""
    ts = [round(t * (T - 1) / 999) for t in FORWARD_T]
    noise = torch.randn(face.shape, generator=torch.Generator(device=device).manual_seed(args.seed), device=device)
    rows = []
    for name in SCHEDULES:
        d = GaussianDiffusion(T, name)
        rows.append(to_uint8(torch.cat([d.q_sample(face, torch.tensor([t], device=device), noise) for t in ts])))
    save_figure(args, face_grid(rows, [f"t={t}" for t in ts], list(SCHEDULES), max(1, 64 // face.shape[-1])))


def figure_reverse(args, draw, timesteps, x_T):
    """x_t (the top row of each pair) and the x0 predicted from it (the bottom row) at about ten of the sampler's steps,
    then the sample; and a GIF of every step. x_T: (n, 3, H, W) starting noise for up to 8 faces."""
    ts = sorted(set(int(t) for t in timesteps), reverse=True)
    x0, frames = draw(len(x_T), x_T=x_T, keep=ts)  # frames: (t, the chain after the step from t, x0_hat at t)
    inputs = [x_T] + [x for _, x, _ in frames[:-1]]  # x_t, the chain where the model is evaluated at t
    steps = [(f"t={t}", to_uint8(x), to_uint8(p)) for (t, _, p), x in zip(frames, inputs)] + [("sample", x0, x0)]
    shown = [steps[round(i * (len(steps) - 2) / 9)] for i in range(10)] + steps[-1:] if len(steps) > 11 else steps
    scale, n = max(1, 64 // x_T.shape[-1]), len(x_T)
    rows = [torch.stack([s[k][i] for s in shown]) for i in range(n) for k in (1, 2)]
    save_figure(args, face_grid(rows, [s[0] for s in shown], ["x_t", "x0_hat"] * n, scale))
    gif = [face_grid([x, p], [label] + [""] * (n - 1), ["x_t", "x0_hat"], scale) for label, x, p in steps]
    save_figure(args, gif[0], os.path.splitext(args.out)[0] + ".gif", save_all=True, append_images=gif[1:],
                duration=[100] * (len(gif) - 1) + [2000], loop=0)


def figure_schedules(args):
    """alpha_bar_t and log-SNR = log(alpha_bar / (1 - alpha_bar)) against t for the three schedules, at the checkpoint's T."""
    T = load_checkpoint(args.ckpt)["args"]["timesteps"] if args.ckpt else 1000
    ds = [GaussianDiffusion(T, name) for name in SCHEDULES]
    ts = list(range(T))
    a = line_chart([(d.schedule, ts, d.alphas_cumprod.tolist()) for d in ds], "alpha_bar_t", "t")
    b = line_chart([(d.schedule, ts, torch.log(d.snr).tolist()) for d in ds], "log-SNR", "t")
    img = Image.new("RGB", (a.width + b.width, a.height), "white")
    img.paste(a, (0, 0))
    img.paste(b, (a.width, 0))
    save_figure(args, img)


def figure_loss(args):
    """The training loss of every progress line and the validation loss, from log.csv beside the checkpoint."""
    if args.ckpt is None:
        raise UsageError("--figure loss reads the run's log.csv: give the checkpoint or its folder")
    path = os.path.join(args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(args.ckpt), "log.csv")
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError:
        raise UsageError(f"--figure loss: no {path}; give the checkpoint in a train.py --out folder")
    series = [(name, [int(r["step"]) for r in rows if r[col]], [float(r[col]) for r in rows if r[col]])
              for name, col in (("train loss", "loss"), ("val loss", "val_loss"))]
    series = [s for s in series if s[1]]
    if not series:
        raise UsageError(f"--figure loss: {path} has no loss rows yet; train for at least --log-every steps")
    save_figure(args, line_chart(series, f"loss ({os.path.basename(os.path.dirname(os.path.abspath(path)))})", "step", log_y=True, size=(480, 300)))


def write_images(args, batches, first=0, grid=True, pngs=True, nrow=None):
    """The numbered PNGs in --out-dir (from number `first`), and/or the grid --out of the first 1,024 images."""
    x = torch.cat(batches)
    n_pngs = len(x) if pngs else args.n
    if pngs and args.out_dir:
        for i, img in enumerate(x):
            atomic_write(lambda tmp: torchvision.io.write_png(img, tmp), os.path.join(args.out_dir, f"{first + i:06d}.png"), "--out-dir")
    if grid:
        x = x[:1024]
        nrow = nrow or (int(math.sqrt(len(x)) + 0.5) if len(x) > 8 else len(x))
        fmt = Image.registered_extensions()[os.path.splitext(args.out)[1].lower()]  # the temporary name has no extension
        atomic_write(lambda tmp: torchvision.utils.save_image(x.float() / 255, tmp, format=fmt, nrow=nrow), args.out, "--out")
        print(f"wrote {args.out}" + (f" and {n_pngs} PNGs in {args.out_dir}" if args.out_dir else ""))


if __name__ == "__main__":
    main()
