"""
Every setting of a training run in one table: its flag, default and help (argparse's), which runs take it
(a diffusion run, an autoencoder run, a latent run, --bench) and what a --resume does with it (it may change
it, the checkpoint's is kept, or it is no setting of the run). train.py parses its command line with this
table, refuses a flag that the run does not take or flags that do not go together (check), and takes a
resumed run's settings from its checkpoint by it (resumed).
"""
import argparse
import math
import os
from dataclasses import dataclass

import autoencoder
import data
import text
import util
from diffusion import DEFAULT_SAMPLER, DEFAULT_STEPS, OBJECTIVES, SCHEDULES


# which runs a flag is for: every training run is a diffusion or an autoencoder run; a latent run (a
# diffusion run on an autoencoder's latents) and --bench take flags of their own too
DIFFUSION, AUTOENCODER, LATENT, BENCH = "diffusion", "autoencoder", "latent", "bench"
RUN_NAMES = {DIFFUSION: "a diffusion run", AUTOENCODER: "an autoencoder run (--autoencoder)",
             LATENT: "a latent run (--latents AE_CKPT)", BENCH: "--bench"}
ANY = {DIFFUSION, AUTOENCODER}
# what a --resume does with a setting: it may change it, the checkpoint's is kept (a contradicting flag is
# refused), or it is no setting of the run (never taken from the checkpoint)
MAY, FIXED, ONCE = "may change", "fixed", "once"
PRESET_FLAGS = ("ch", "ch_mult", "num_res_blocks", "attn_res", "dropout")  # None: the --size preset's value
# a run on a trained base (--control BASE, --finetune BASE) takes these settings from the base's run where
# they are not given, and refuses the flags that would make another network or data than the base's
FROM_BASE = ("size", "crop", "timesteps", "schedule", "objective", "min_snr_gamma", "attrs", "attr_film",
             "p_uncond", "p_drop_attr", "text", "text_dim", "text_layers", "max_tokens", "posterior",
             "batch_size", "lr")
NOT_FOR_CONTROL = (*PRESET_FLAGS, *FROM_BASE[:-2], "latents", "autoencoder", "latent_diffusion", "factor",
                   "z_channels")
DREAMBOOTH = ("instance_prompt", "class_prompt", "prior_weight", "class_images")  # --finetune's own


@dataclass
class Setting:
    resume: str  # MAY, FIXED or ONCE
    runs: set  # the runs that take it


SETTINGS = {}  # dest -> Setting, filled by make_parser


def int_list(s):
    """Comma-separated positive integers, e.g. 1,2,2,2."""
    parts = s.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError("expected comma-separated positive integers such as 1,2,2,2, got "
                                         f"{s!r}")
    return tuple(int(p) for p in parts)


def drop_rate(s):
    """argparse type for --p-drop-attr: 'uniform', 'balanced' or a probability."""
    if s in ("uniform", "balanced"):
        return s
    if not 0 <= float(s) <= 1:
        raise argparse.ArgumentTypeError(f"must be 'uniform', 'balanced' or in [0, 1], got {s}")
    return float(s)


def run_kinds(cfg):
    """What this run is, as the flags' `runs` name it."""
    kinds = {AUTOENCODER if cfg.autoencoder else DIFFUSION}
    if cfg.latents:
        kinds.add(LATENT)
    if cfg.bench:
        kinds.add(BENCH)
    return kinds


def check(cfg, given, world):
    """The flags of a run (`given`: those typed) go together and are the run's: one line for the first that
    does not, naming the fix."""
    runs = run_kinds(cfg)
    for flag in sorted(given):
        if not SETTINGS[flag].runs & runs:
            wanted = " or ".join(RUN_NAMES[r] for r in sorted(SETTINGS[flag].runs))
            dashed = "--" + flag.replace("_", "-")
            raise util.UsageError(f"{dashed} is for {wanted}, not for this run; drop {dashed}")
    loose = next((f for f in ("p_drop_attr", "attr_film") if f in given), "").replace("_", "-")
    based = next((f for f in NOT_FOR_CONTROL if f in given), "").replace("_", "-")
    dreamt = next((f for f in DREAMBOOTH if f in given), "").replace("_", "-")
    words = next((f for f in ("text_dim", "text_layers", "max_tokens") if f in given), "").replace("_", "-")
    for bad, message in [
        (cfg.control and based, f"--{based}: a control run takes its base's network, size and condition; "
         f"drop --{based}, or train another base"),
        (cfg.finetune and based, f"--{based}: a fine-tuning run takes its base's network, size and "
         f"condition; drop --{based}"),
        (cfg.finetune and (cfg.control or cfg.hint_concat), "--finetune and --control (or --hint-concat) "
         "each train on a base of their own: use one of them"),
        (dreamt and not cfg.finetune, f"--{dreamt} is for fine-tuning a text model on photos of one person; "
         "add --finetune BASE_CKPT, or drop it"),
        ("eval_every" in given and cfg.finetune, "--eval-every: a fine-tuning run has no validation images "
         "(every photo of the person trains); drop it"),
        (cfg.bench and cfg.finetune, "--bench times the training step of a network; drop --finetune (its "
         "step is its base's)"),
        (cfg.control and cfg.hint_concat, "--hint-concat trains the baseline of a ControlNet from scratch, "
         "--control a ControlNet on a trained base: use one of them"),
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
        ("p_uncond" in given and not (cfg.attrs or cfg.text), "--p-uncond sets how often a conditional model "
         "drops its condition; add --attrs NAMES or --text, or drop it"),
        (words and not cfg.text, f"--{words} shapes a text model's encoder; add --text, or drop it"),
        (cfg.text and cfg.attrs, "--text and --attrs both condition the model: use one of them"),
        (cfg.sample_steps > cfg.timesteps and "sample_steps" in given,
         f"--sample-steps {cfg.sample_steps} is more than --timesteps {cfg.timesteps}; lower it"),
        (cfg.batch_size % world, f"--batch-size {cfg.batch_size} must be divisible by the number of "
         f"processes ({world})"),
    ]:
        if bad:
            raise util.UsageError(message)


def resumed(args, given, ckpt, path):
    """The settings of the run a --resume continues: every one from the checkpoint (at `path`); a flag that
    contradicts it is refused. A model flag is compared with the network's own value where the run left it to
    the preset; a flag that the run does not take is left for check() to refuse by name."""
    cfg = vars(args).copy()
    if "out" not in given and args.resume != "latest":  # in the checkpoint's folder
        cfg["out"] = path if os.path.isdir(path) else os.path.dirname(path) or "."
    kinds = run_kinds(argparse.Namespace(**ckpt["args"]))
    for k, v in ckpt["args"].items():
        if v is None and k in PRESET_FLAGS:  # left to the preset: the network's own value
            v = ckpt["model_args"].get(k)
        if isinstance(v, list):
            v = tuple(v)
        if k not in cfg or SETTINGS[k].resume == ONCE or k == "out":
            continue
        if k in given and not SETTINGS[k].runs & kinds:
            continue
        if k == "latents" and k in given:
            same_autoencoder(cfg[k], v, ckpt, path)
            continue
        if k in given and SETTINGS[k].resume == FIXED and cfg[k] != v:
            flag = "--" + k.replace("_", "-")
            what = f"{flag} {shown(cfg[k])} contradicts the checkpoint's {shown(v)} ({path})"
            if isinstance(v, bool):  # a switch: given, it was off in the run
                what = f"{flag} contradicts the checkpoint {path}, whose run was trained without it"
            raise util.UsageError(f"{what}; drop {flag} to continue the run, or start a new run in another "
                                  "--out")
        if k not in given:
            cfg[k] = v
    if "epochs" in given and "max_steps" not in given:  # extended by epochs: not the saved --max-steps
        cfg["max_steps"] = None
    return argparse.Namespace(**cfg)


def same_autoencoder(given, saved, ckpt, path):
    """--latents on a resume: the run's own autoencoder (by any path to that file), or a one-line refusal."""
    if saved is None:
        raise util.UsageError(f"--latents: the checkpoint's run ({path}) is a DDPM on pixels, not on an "
                              "autoencoder's latents; drop --latents to continue it, or start a latent run "
                              "in another --out")
    source = ckpt.get("autoencoder_args", {}).get("path", saved)
    if checkpoint_file(given) not in (checkpoint_file(saved), checkpoint_file(source)):
        raise util.UsageError(f"--latents {given}: the checkpoint's run ({path}) learns the latents of "
                              f"{source}, which it carries; drop --latents to continue it, or start a new "
                              "run in another --out")


def shown(value):
    """A setting as it is typed: 1,2,2 for a tuple."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


def checkpoint_file(path):
    """The file a checkpoint's path means, whatever path leads there (a folder means its ckpt.pt)."""
    path = os.path.realpath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "ckpt.pt")
    return path


AUTOENCODER_SHARE = 1 / 3  # of the budget, for the autoencoder: ae4 10 min + ldm4 20 min (REPORT sec. 3.11)
BOTH = {"data", "download", "size", "crop", "cache_dir", "no_flip", "seed", "device", "precision", "compile",
        "channels_last", "grad_checkpoint", "log_every", "factor", "z_channels", "attrs", "attr_film",
        "p_uncond", "p_drop_attr", "text", "text_dim", "text_layers", "max_tokens", "overwrite", "minutes",
        "out", "resume", "latent_diffusion"}


def replace(cfg, **changes):
    """A copy of the settings with `changes` (never changed in place)."""
    return argparse.Namespace(**{**vars(cfg), **changes})


def stages(args, given):
    """The runs of a command: [None], the one it describes; or for --latent-diffusion --minutes N the
    command lines of latent diffusion's two stages, each a run of its own with its share of the budget: the
    autoencoder (the laptop recipe: one block per level) for AUTOENCODER_SHARE in OUT/autoencoder, then a DDPM
    on its latents for the rest in OUT/ddpm. With --resume a stage that has a checkpoint continues (one that
    ended says there is nothing to do), one that has none starts."""
    if not args.latent_diffusion:
        return [None]
    for flag in sorted(given - BOTH):
        dashed = "--" + flag.replace("_", "-")
        raise util.UsageError(f"{dashed} sets one stage: drop it, or train the two stages with their own "
                              "commands (README, Latent diffusion)")
    if not args.minutes:
        raise util.UsageError("--latent-diffusion splits a --minutes budget between its two stages: add "
                              "--minutes N")
    ae = os.path.join(args.out, "autoencoder")
    runs = [("autoencoder", ae, AUTOENCODER_SHARE, ["--autoencoder", "--num-res-blocks", "1"]),
            ("ddpm", os.path.join(args.out, "ddpm"), 1 - AUTOENCODER_SHARE, ["--latents", ae])]
    argvs = []
    for name, out, share, own in runs:
        kinds = {AUTOENCODER} if name == "autoencoder" else {DIFFUSION, LATENT}
        typed_here = given - {"minutes", "out", "resume", "latent_diffusion"}
        flags = [f for f in sorted(typed_here) if SETTINGS[f].runs & kinds]
        argv = [a for f in flags for a in typed(f, getattr(args, f))]
        argv += [*own, "--minutes", f"{args.minutes * share:g}", "--out", out]
        if args.resume and os.path.exists(os.path.join(out, "ckpt.pt")):
            argv = ["--resume", "--out", out]
        argvs.append(argv)
    return argvs


def typed(flag, value):
    """A setting as a command line types it: ['--size', '64'], ['--no-flip'], [] for a switch that is off."""
    dashed = "--" + flag.replace("_", "-")
    if value is True:
        return [dashed]
    if value is False or value is None:
        return []
    return [dashed, str(shown(value))]


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
positive_real = util.positive(float)
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
    add("--ch-mult", FIXED, {DIFFUSION}, type=int_list, help="channel multiplier per level, e.g. "
        "1,2,2,2")
    add("--num-res-blocks", FIXED, type=pos, help="residual blocks per level")
    add("--attn-res", FIXED, {DIFFUSION}, type=int_list, help="feature-map sizes with self-attention")
    add("--dropout", FIXED, {DIFFUSION}, type=util.real, help="dropout in the residual blocks")
    add("--timesteps", FIXED, {DIFFUSION}, type=util.between(2, math.inf, int), default=1000,
        help="T, the diffusion steps")
    add("--schedule", FIXED, {DIFFUSION}, default="linear", choices=SCHEDULES, help="beta schedule")
    add("--objective", FIXED, {DIFFUSION}, default="eps", choices=OBJECTIVES, help="what the network "
        "predicts")
    add("--min-snr-gamma", FIXED, {DIFFUSION}, type=positive_real, help="min-SNR-gamma weighting")

    add = adder("latent diffusion: the autoencoder, then a DDPM on its latents")
    add("--autoencoder", FIXED, action="store_true", help="train the autoencoder (autoencoder.py) instead of "
        "a DDPM")
    add("--factor", FIXED, {AUTOENCODER}, type=int, default=4, choices=autoencoder.FACTORS,
        help="the autoencoder's downsampling factor f")
    add("--z-channels", FIXED, {AUTOENCODER}, type=pos, default=4, help="the latent's channels")
    add("--kl-weight", FIXED, {AUTOENCODER}, type=util.between(0, 1), default=autoencoder.KL_WEIGHT,
        help="the KL term's weight")
    add("--no-mid-attn", FIXED, {AUTOENCODER}, action="store_true", help="no self-attention in the "
        "autoencoder's middle")
    add("--latent-diffusion", ONCE, action="store_true", help="both stages in one --minutes budget: the "
        "autoencoder in OUT/autoencoder, then the DDPM on its latents in OUT/ddpm (the laptop recipe)")
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

    add = adder("ControlNet: steer a trained DDPM with each face's edges (control.py)")
    add("--control", FIXED, {DIFFUSION}, type=util.path, metavar="BASE_CKPT", help="train a ControlNet on "
        "this DDPM's checkpoint, locked: a copy of its encoder learns to follow edge maps")
    add("--hint-concat", FIXED, {DIFFUSION}, action="store_true", help="a ControlNet's baseline: a DDPM from "
        "scratch that reads each image's edge map as more input channels")

    add = adder("DreamBooth: fine-tune a text model on photos of one person (text.py)")
    add("--finetune", FIXED, {DIFFUSION}, type=util.path, metavar="BASE_CKPT", help="fine-tune this text "
        "model on --data's 3-5 photos of one person (every photo trains), named by --instance-prompt")
    add("--instance-prompt", FIXED, {DIFFUSION}, default="a photo of sks person", help="the photos' caption: "
        "a rare word for the person (new words join the vocabulary), then the class")
    add("--class-prompt", FIXED, {DIFFUSION}, default="a photo of a person", help="prior preservation: the "
        "person's class, which the model draws --class-images of before training")
    add("--prior-weight", FIXED, {DIFFUSION}, type=util.between(0, math.inf), default=1.0, help="the class "
        "images' loss weight (0: no prior preservation)")
    add("--class-images", FIXED, {DIFFUSION}, type=pos, default=100, help="class images drawn once, kept in "
        "--out")

    add = adder("text: captions, a text encoder trained with the U-Net, cross-attention (text.py)")
    add("--text", FIXED, {DIFFUSION}, action="store_true", help="condition on captions: a .txt beside each "
        "image or a metadata.jsonl; for CelebA, sentences made from its attributes")
    add("--text-dim", FIXED, {DIFFUSION}, type=pos, default=256, help="the text encoder's width")
    add("--text-layers", FIXED, {DIFFUSION}, type=pos, default=3, help="the text encoder's transformer "
        "blocks")
    add("--max-tokens", FIXED, {DIFFUSION}, type=util.between(4, 512, int), default=text.MAX_TOKENS,
        help="tokens of a caption (longer ones are cut, and said so)")


def add_run_flags(adder):
    """The settings of how a run trains, how fast, and what it writes."""
    add = adder("optimisation")
    add("--epochs", MAY, type=pos, default=100, help="passes over the training split")
    add("--max-steps", MAY, type=pos, help="stop after this many steps (not --epochs)")
    add("--minutes", FIXED, type=util.positive(float, 525_600), help="fit the whole run into N minutes (a "
        "year at most)")
    add("--batch-size", FIXED, type=pos, default=128, help="global batch, split over the GPUs")
    add("--lr", FIXED, type=positive_real, default=2e-4, help="peak AdamW learning rate")
    add("--warmup", FIXED, type=util.count, default=5000, help="LR warm-up steps (at most a tenth of "
        "the run)")
    add("--lr-decay", FIXED, default="constant", choices=["constant", "cosine"], help="after the warm-up")
    add("--weight-decay", FIXED, type=util.between(0, math.inf), default=0.0, help="AdamW weight decay")
    add("--grad-clip", FIXED, type=positive_real, default=1.0, help="clip the gradient norm to this")
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
    add("--sample-every", MAY, type=util.count, default=5000, help="a sample grid every N steps (0: "
        "never)")
    add("--sample-steps", MAY, {DIFFUSION}, type=pos, default=DEFAULT_STEPS, help=f"the grids' "
        f"{DEFAULT_SAMPLER} steps")
    add("--sample-n", MAY, type=util.between(1, 1024, int), default=64, help="images in a grid")
    add("--eval-every", MAY, type=util.count, default=5000, help="a validation loss every N steps (0: "
        "never)")
    add("--eval-images", MAY, type=pos, default=1024, help="validation images")
    add("--ckpt-every", MAY, type=util.count, default=5000, help="write ckpt.pt every N steps (0: at "
        "the end)")
    add("--resume", ONCE, nargs="?", const="latest", type=util.path, help="continue a run (default: ckpt.pt "
        "in --out)")
    add("--other-data", ONCE, action="store_true", help="resume on other images than the run's")
    add("--dry-run", ONCE, action="store_true", help="check a setup: 2 steps of one image, then a checkpoint")

    add = adder("benchmark")
    add("--bench", ONCE, action="store_true", help="time training steps: img/s, MFU")
    add("--bench-steps", ONCE, {BENCH}, type=pos, default=20, help="timed steps for --bench")
    add("--peak-tflops", ONCE, {BENCH}, type=positive_real, help="the device's peak TFLOP/s for MFU")
