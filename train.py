"""
Train a DDPM on CelebA. One GPU, many (torchrun), MPS or CPU.

    python train.py --data data --size 64 --epochs 100
    torchrun --nproc_per_node=8 train.py --data data --size 64 --epochs 100
    python train.py --resume                   # continue from out/ckpt.pt
    python train.py --bench --compile          # img/s, TFLOP/s and MFU on synthetic data

Everything random in step s (the batch order, flips, t, noise) is drawn from a generator seeded with
(seed, s) for the whole global batch, and each rank takes its slice. So a resumed run repeats the
uninterrupted one, and N GPUs train on exactly what one GPU at the same --batch-size would.
"""
import argparse
import contextlib
import copy
import csv
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode
import torchvision

import data
import unet
from data import positive
from diffusion import OBJECTIVES, SCHEDULES, GaussianDiffusion

CKPT_FORMAT = "ddpm-faces-checkpoint-v1"
# dense bf16 tensor-core peak (TFLOP/s) by device name; the first match wins. --peak-tflops overrides.
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250), ("A100", 312),
               ("L40S", 362), ("L4", 121), ("A10G", 70), ("A10", 125), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125)]


class CheckpointError(Exception):
    """A missing, corrupt or foreign checkpoint: printed as one line."""


def pick_device(name, local_rank=0):
    """--device -> torch.device: the first available of cuda, mps, cpu when name is None."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise data.DataError(f"--device {name}: not a device; use cuda, cuda:N, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise data.DataError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise data.DataError(f"--device {name}: MPS is not available here; use --device cpu")
    return device


def int_list(s):
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,2,2, got {s!r}")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train a DDPM (denoising diffusion) on CelebA faces.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data", help="CelebA root (torchvision or Kaggle layout) or a folder of images")
    g.add_argument("--download", action="store_true", help="try torchvision's CelebA download into --data if no images are there")
    g.add_argument("--size", type=positive(int), default=64, help="image size; also picks the U-Net preset (32, 64, 128, 256)")
    g.add_argument("--crop", default="auto", choices=data.CROPS, help="auto: the DDIM CelebA box for 178x218 images, else a centre square")
    g.add_argument("--cache-dir", default=None, help="where decoded images are cached (default ~/.cache/ddpm-faces)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    g = p.add_argument_group("model (defaults come from the --size preset)")
    g.add_argument("--ch", type=positive(int), default=None, help="base channel count")
    g.add_argument("--ch-mult", type=int_list, default=None, help="channel multiplier per level, e.g. 1,2,2,2,4")
    g.add_argument("--num-res-blocks", type=positive(int), default=None, help="residual blocks per level")
    g.add_argument("--attn-res", type=int_list, default=None, help="feature-map sizes with self-attention, e.g. 16")
    g.add_argument("--dropout", type=float, default=None, help="dropout in the residual blocks")
    g = p.add_argument_group("diffusion")
    g.add_argument("--timesteps", type=positive(int), default=1000, help="T, the number of diffusion steps")
    g.add_argument("--schedule", default="linear", choices=SCHEDULES, help="beta schedule")
    g.add_argument("--objective", default="eps", choices=OBJECTIVES, help="what the network predicts")
    g.add_argument("--min-snr-gamma", type=positive(float), default=None, help="min-SNR-gamma loss weighting (e.g. 5); off by default")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive(int), default=100, help="passes over the training split")
    g.add_argument("--max-steps", type=positive(int), default=None, help="stop after this many steps in all (overrides --epochs)")
    g.add_argument("--batch-size", type=positive(int), default=128, help="global batch size, split over the GPUs")
    g.add_argument("--lr", type=positive(float), default=2e-4, help="peak AdamW learning rate")
    g.add_argument("--warmup", type=int, default=5000, help="linear learning-rate warm-up steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=positive(float), default=1.0, help="clip the gradient norm to this")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (with warm-up min(decay, (1+s)/(10+s)))")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: drawn at random and printed)")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision; auto = bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU/MPS")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last memory format")
    g.add_argument("--grad-checkpoint", default="auto", choices=["auto", "on", "off"],
                   help="recompute each U-Net block in backward (less memory, ~1/3 more compute); auto: on only when "
                        "the measured activation memory of a batch would not fit the GPU")
    g = p.add_argument_group("logging, evaluation and checkpoints")
    g.add_argument("--out", default="out", help="folder for checkpoints, sample grids and log.csv")
    g.add_argument("--log-every", type=positive(int), default=100, help="print a progress line every N steps")
    g.add_argument("--sample-every", type=int, default=5000, help="sample grid from fixed noise with the EMA weights every N steps (0: never)")
    g.add_argument("--sample-steps", type=positive(int), default=50, help="DDIM steps for those grids")
    g.add_argument("--sample-n", type=positive(int), default=64, help="images in those grids")
    g.add_argument("--eval-every", type=int, default=5000, help="validation loss every N steps (0: never)")
    g.add_argument("--eval-images", type=positive(int), default=1024, help="validation images per evaluation")
    g.add_argument("--ckpt-every", type=int, default=5000, help="write out/ckpt.pt every N steps (and always at the end)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint: a path, or no value for the latest in --out")
    g.add_argument("--dry-run", action="store_true", help="2 steps, then one eval, sample grid and checkpoint: checks a setup quickly")
    g = p.add_argument_group("benchmark")
    g.add_argument("--bench", action="store_true", help="time training steps on synthetic data and print img/s, TFLOP/s, MFU")
    g.add_argument("--bench-steps", type=positive(int), default=20, help="timed steps for --bench")
    g.add_argument("--peak-tflops", type=positive(float), default=None, help="the device's peak TFLOP/s for MFU (default: from a table)")
    return p.parse_args(argv)

# -----------------------------------------------------------------------------
# checkpoints: one self-describing file, written atomically


def save_checkpoint(obj, path):
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-save leaves the previous checkpoint intact


def load_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors for missing, corrupt and foreign files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found; pass the ckpt.pt that train.py wrote (in its --out folder)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated? {type(e).__name__}); "
                              "use another checkpoint or retrain")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} was not written by this project's train.py (no '{CKPT_FORMAT}' marker); "
                              "pass a ckpt.pt from train.py's --out folder")
    return ckpt


def model_config(args):
    return unet.preset(args.size, ch=args.ch, ch_mult=args.ch_mult, num_res_blocks=args.num_res_blocks,
                       attn_res=args.attn_res, dropout=args.dropout)


def lr_at(step, args):
    return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup > 0 else args.lr


@torch.no_grad()
def update_ema(ema_params, params, step, decay):
    # ema = decay * ema + (1 - decay) * param, in one foreach kernel, as torch.optim.swa_utils'
    # get_ema_multi_avg_fn does. AveragedModel.update_parameters itself is not used: it reads its step
    # counter on the host every call, a GPU sync per step. Here the warm-up decay is a Python float.
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1.0 - d)


def train_step(fwd, diffusion, x0, t, noise, opt, scaler, ctx, params, ema_params, step, args):
    """One optimisation step on the L_simple loss; returns the loss as a tensor (no host sync)."""
    with ctx:
        loss = diffusion.training_losses(fwd, x0, t, noise).mean()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # so that clipping sees the true gradient under fp16
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip, foreach=True)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    update_ema(ema_params, params, step, args.ema_decay)
    return loss.detach()


def activation_bytes_per_image(model, diffusion, size, device, ctx):
    """Bytes that autograd keeps for backward per image: the slope between forwards of 1 and 2 images."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    def measure(b):
        seen = set(params)
        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                measure.total += t.untyped_storage().nbytes()
            return t
        measure.total = 0
        x = torch.randn(b, 3, size, size, device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            diffusion.training_losses(model, x, torch.zeros(b, dtype=torch.long, device=device), x)
        return measure.total
    return measure(2) - measure(1)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except (data.DataError, CheckpointError, OSError) as e:  # bad input: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def train(args):
    # ---- processes and devices: DDP when torchrun set RANK
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device = pick_device(args.device, local_rank)
    if not 0 <= args.ema_decay < 1:
        raise data.DataError(f"--ema-decay {args.ema_decay}: must be in [0, 1), e.g. 0.9999")
    if args.sample_steps > args.timesteps:
        raise data.DataError(f"--sample-steps {args.sample_steps} is more than --timesteps {args.timesteps}; lower it")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise data.DataError(f"--out {args.out}: is a file; give a folder for checkpoints and samples")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.precision == "auto":
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    ctx = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul/conv work
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True

    # ---- resume: model and diffusion come from the checkpoint
    ckpt = None
    if args.resume:
        path = os.path.join(args.out, "ckpt.pt") if args.resume == "latest" else args.resume
        ckpt = load_checkpoint(path)
        for k in ("size", "ch", "ch_mult", "num_res_blocks", "attn_res", "dropout", "timesteps", "schedule", "objective",
                  "min_snr_gamma", "seed", "crop"):
            setattr(args, k, ckpt["args"][k])
        log(f"resuming from {path} at step {ckpt['step']}")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little") % 2**31
    torch.manual_seed(args.seed + rank)  # dropout; all data randomness comes from `gen` below
    log(f"device {device} x {world} process{'es' if world > 1 else ''}, precision {args.precision}, seed {args.seed}")

    # ---- data (first, so that a wrong --data fails before anything is built)
    if not args.bench:
        if args.download and master:
            try:
                data.select(args.data)
            except data.DataError:
                data.download(args.data, log)
        if ddp and not master:
            dist.barrier()  # rank 0 decodes and writes the cache first; the others then load it
        faces = data.load(args.data, args.size, "train", args.crop, args.cache_dir, log=log)
        if ddp and master:
            dist.barrier()
        val = None
        if master and args.eval_every > 0:
            try:
                v = data.load(args.data, args.size, "valid", args.crop, args.cache_dir, log=log)
                val = data.to_float(v["images"][: args.eval_images], device)
            except data.DataError as e:
                log(f"no validation loss: {e}")

    # ---- model, EMA, optimizer
    try:
        cfg = unet.UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model_args"].items()}) if ckpt else model_config(args)
        model = unet.UNet(cfg)
        diffusion = GaussianDiffusion(args.timesteps, args.schedule, args.objective, args.min_snr_gamma).to(device)
    except ValueError as e:
        raise data.DataError(str(e))
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")  # fused: the whole update in a few kernels
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")  # a no-op unless fp16
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        if ckpt.get("world_size") == world:  # the dropout RNG continues exactly on the same world size
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        else:
            torch.manual_seed(args.seed + rank + step)
    log(f"model: {model.num_params() / 1e6:.2f}M parameters, {cfg}")
    if args.grad_checkpoint == "auto" and device.type == "cuda":
        act = activation_bytes_per_image(model, diffusion, cfg.image_size, device, ctx) * (args.batch_size // world)
        state = 20 * model.num_params()  # fp32 weights, grads, two Adam moments and the EMA copy
        total = torch.cuda.get_device_properties(device).total_memory
        model.grad_checkpoint = act + state > 0.85 * total
        log(f"memory: ~{act / 2**30:.1f} GiB of activations + {state / 2**30:.1f} GiB of weights and optimizer state, "
            f"{total / 2**30:.1f} GiB on the GPU: activation checkpointing {'on' if model.grad_checkpoint else 'off'}")
    else:
        model.grad_checkpoint = args.grad_checkpoint == "on"
    fwd = torch.compile(model) if args.compile else model  # saved state dicts come from `model`: no _orig_mod. prefix
    fwd = DDP(fwd, device_ids=[local_rank] if device.type == "cuda" else None) if ddp else fwd

    if args.bench:
        return bench(args, model, fwd, diffusion, opt, scaler, ctx, device, world, log)

    batches = data.Batches(faces["images"], args.batch_size, device, args.seed, rank, world, flip=not args.no_flip)
    total = batches.steps_per_epoch * args.epochs
    if args.max_steps:
        total = args.max_steps
    if args.dry_run:
        total = step + 2
        args.sample_steps, args.sample_n = min(args.sample_steps, 10), min(args.sample_n, 16)
    log(f"data: {len(faces['images']):,} training images, {batches.steps_per_epoch:,} steps per epoch at batch {args.batch_size}, "
        f"{total:,} steps in all")

    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    gen = torch.Generator(device=device)  # re-seeded every step: all of a step's randomness
    b = args.batch_size // world
    shard = slice(rank * b, (rank + 1) * b)
    x_T = torch.randn(args.sample_n, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)).to(device)

    def checkpoint():
        sd = {k: v for k, v in model.state_dict().items()}
        if not all(torch.isfinite(v).all() for v in sd.values()):
            return False
        save_checkpoint(dict(format=CKPT_FORMAT, args=vars(args), model_args=unet.config_dict(cfg), model=sd,
                             ema=ema.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                             step=step, epoch=step // batches.steps_per_epoch, world_size=world,
                             rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None)),
                        ckpt_path)
        return True

    def sample_grid():
        with ctx:
            x = diffusion.sample(ema, x_T.shape, "ddim", args.sample_steps, x_T=x_T, device=device)
        path = os.path.join(args.out, f"samples_{step:07d}.png")
        torchvision.utils.save_image((x.float() + 1) / 2, path, nrow=int(math.sqrt(args.sample_n) + 0.5))
        return path

    @torch.no_grad()
    def val_loss():
        model.eval()
        g = torch.Generator(device=device).manual_seed(0)  # the same t and noise at every evaluation
        losses = []
        for i in range(0, len(val), b):
            x0 = val[i:i + b]
            t = torch.randint(0, args.timesteps, (len(x0),), generator=g, device=device)
            with ctx:
                losses.append(diffusion.training_losses(model, x0, t, torch.randn(x0.shape, generator=g, device=device)))
        model.train()
        return torch.cat(losses).mean().item()

    # ---- Ctrl-C: finish the step, write a checkpoint, exit
    stop = []
    def on_sigint(signum, frame):
        stop.append(signum)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C exits at once
    signal.signal(signal.SIGINT, on_sigint)

    log_file = open(os.path.join(args.out, "log.csv"), "a", newline="") if master else None
    writer = csv.writer(log_file) if master else None
    if master and log_file.tell() == 0:
        writer.writerow(["step", "epoch", "loss", "val_loss", "lr", "img_per_s", "elapsed_s"])
    ema_params, params = list(ema.parameters()), list(model.parameters())
    loss_sum, n_loss = torch.zeros((), device=device), 0
    t0 = t_log = time.time()
    step_log = step
    model.train()
    while step < total:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        gen.manual_seed(args.seed * 1_000_003 + step)
        x0 = batches.get(step, gen)  # (B/world, 3, H, W) in [-1, 1]
        t = torch.randint(0, args.timesteps, (args.batch_size,), generator=gen, device=device)[shard]  # Algorithm 1, line 3
        noise = torch.randn((args.batch_size, *x0.shape[1:]), generator=gen, device=device)[shard]  # line 4
        if args.channels_last:
            x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        loss = train_step(fwd, diffusion, x0, t, noise, opt, scaler, ctx, params, ema_params, step, args)  # line 5
        loss_sum += loss
        n_loss += 1
        step += 1

        last = step == total
        if step % args.log_every == 0 or last or (stop and not ddp):
            if ddp:  # the mean loss over ranks, and whether any rank saw Ctrl-C
                flags = torch.stack([loss_sum, torch.tensor(float(bool(stop)), device=device)])
                dist.all_reduce(flags)
                loss_sum, stop_any = flags[0] / world, flags[1].item() > 0
                if stop_any and not stop:
                    stop.append(signal.SIGINT)
            loss_avg = loss_sum.item() / n_loss
            if not math.isfinite(loss_avg):
                good = f"the last good checkpoint {ckpt_path} was kept" if os.path.exists(ckpt_path) else "no checkpoint was written"
                raise SystemExit(f"error: the loss became {loss_avg} by step {step}: training diverged; {good}. "
                                 "Lower --lr, raise --warmup, or use --precision bf16/fp32.")
            now = time.time()
            ips = (step - step_log) * args.batch_size / (now - t_log)
            eta = (total - step) * (now - t_log) / max(step - step_log, 1)
            log(f"epoch {step // batches.steps_per_epoch} | step {step}/{total} | loss {loss_avg:.4f} | {ips:,.1f} img/s | "
                f"lr {lr:.2e} | ETA {fmt_time(eta)}")
            if master:
                writer.writerow([step, step // batches.steps_per_epoch, f"{loss_avg:.6f}", "", f"{lr:.3e}", f"{ips:.1f}", f"{now - t0:.1f}"])
                log_file.flush()
            loss_sum, n_loss, t_log, step_log = torch.zeros((), device=device), 0, now, step
        t_extra = time.time()
        if master and val is not None and (step % args.eval_every == 0 or last):
            vl = val_loss()
            log(f"step {step} | val loss {vl:.4f} ({len(val)} images)")
            writer.writerow([step, step // batches.steps_per_epoch, "", f"{vl:.6f}", "", "", f"{time.time() - t0:.1f}"])
            log_file.flush()
        if master and ((args.sample_every > 0 and step % args.sample_every == 0) or (last and (args.sample_every > 0 or args.dry_run))):
            log(f"step {step} | samples {sample_grid()}")
        saved = False
        if master and ((args.ckpt_every > 0 and step % args.ckpt_every == 0) or last or stop):
            saved = checkpoint()
            log(f"step {step} | checkpoint {ckpt_path}" if saved else f"step {step} | weights not finite: checkpoint not written")
        if stop:
            log(f"interrupted at step {step}" + (f"; checkpoint written. Continue with: python train.py --resume --out {args.out}" if saved else ""))
            break
        t_log += time.time() - t_extra  # evaluation, sampling and saving are not training time
    if log_file:
        log_file.close()
    if ddp:
        dist.destroy_process_group()
    if stop:
        sys.exit(130)

# -----------------------------------------------------------------------------


def bench(args, model, fwd, diffusion, opt, scaler, ctx, device, world, log):
    """Time training steps on synthetic data; count FLOPs with torch.utils.flop_counter."""
    b = args.batch_size // world
    x0 = torch.rand(b, 3, args.size, args.size, device=device) * 2 - 1
    x0 = x0.contiguous(memory_format=torch.channels_last) if args.channels_last else x0
    params = list(model.parameters())
    ema_params = [p.detach().clone() for p in params]

    def one_step(step):
        t = torch.randint(0, args.timesteps, (b,), device=device)
        train_step(fwd, diffusion, x0, t, torch.randn_like(x0), opt, scaler, ctx, params, ema_params, step, args)

    # model FLOPs: forward + backward of the eager model, per process (recomputation is not counted)
    gc, model.grad_checkpoint = model.grad_checkpoint, False
    with FlopCounterMode(display=False) as fc:
        with ctx:
            diffusion.training_losses(model, x0, torch.randint(0, args.timesteps, (b,), device=device), torch.randn_like(x0)).mean().backward()
    model.grad_checkpoint = gc
    opt.zero_grad(set_to_none=True)
    flops = fc.get_total_flops()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t_c = time.time()
    for i in range(3):  # warm-up: compilation, cudnn autotuning
        one_step(i)
    sync()
    log(f"bench: warm-up {time.time() - t_c:.1f}s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    for i in range(args.bench_steps):
        one_step(3 + i)
    sync()
    dt = (time.time() - t0) / args.bench_steps
    tflops = flops / dt / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak = args.peak_tflops or next((p for k, p in PEAK_TFLOPS if k in name), None) if device.type == "cuda" else args.peak_tflops
    mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
    log(f"bench: {name} | size {args.size} | batch {b}/process x {world} | {args.precision} | compile {args.compile} | "
        f"channels_last {args.channels_last} | activation checkpointing {model.grad_checkpoint}")
    log(f"bench: {b * world / dt:,.1f} img/s | {dt * 1e3:.1f} ms/step | peak memory {mem} | {flops / b / 1e9:.2f} GFLOP/img (fwd+bwd) | "
        f"{tflops:.2f} TFLOP/s/process" + (f" | MFU {100 * tflops / peak:.1f}% of {peak:g} TFLOP/s" if peak else " | MFU n/a (pass --peak-tflops)"))
    return dict(img_per_s=b * world / dt, ms_per_step=dt * 1e3, tflops=tflops)


if __name__ == "__main__":
    main()
