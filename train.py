"""
Train a DDPM on CelebA faces: one GPU, many (torchrun), MPS or CPU. Or latent diffusion's two stages: the
autoencoder, then a DDPM on its latents. Or a ControlNet that steers a trained DDPM with edge maps, or
DreamBooth, which fine-tunes a text model on photos of one person.

    python train.py --data data --size 64 --epochs 100
    torchrun --nproc_per_node=8 train.py --data data --size 64 --epochs 100
    python train.py --data data --size 32 --minutes 30   # the run that fits in 30 minutes here
    python train.py --data data --size 64 --autoencoder --minutes 10 --out ae   # latent diffusion: the
    python train.py --data data --latents ae/ckpt.pt --minutes 20 --out ldm     # autoencoder, its DDPM
    python train.py --data data --control ldm/ckpt.pt --minutes 30 --out ctl  # a ControlNet on a DDPM
    python train.py --data me --finetune txt/ckpt.pt --max-steps 400 --out sks  # DreamBooth on a text model
    python train.py --resume --out out                   # continue the run in out/, with its settings
    python train.py --bench                              # img/s, TFLOP/s and MFU on synthetic data

Read from the top: `loop` is [DDPM] Algorithm 1, a step is `train_step`, what it computes is the run's
objective (diffusion.Denoising for a DDPM on images or latents, control.Controlled for a ControlNet on a
trained DDPM, text.PriorPreservation for DreamBooth, autoencoder.Reconstruction for the
autoencoder), which the run's stage (DDPMStage, ControlStage, HintStage, FinetuneStage or AutoencoderStage,
decided once in setup) makes, and what is due now and then is `after_step`. Then the setup, the data and
the model. How a step computes on this machine, whether it fits the memory and how many steps fit --minutes
is budget.py's; the flags, with their defaults, help and resume rules, are settings.py's. `cfg` holds the
settings, `env` the processes and device, `run` what the loop updates. Step s draws the whole global batch's
randomness from a generator seeded with (seed, s): a resume repeats the uninterrupted run, on any number of
GPUs (dropout's masks, each process's own, aside).
"""
import os
import signal
import sys
import time

STARTED = time.time()  # --minutes counts from here: the imports below take seconds


def quit_quietly(signum, frame):
    """Ctrl-C, SIGTERM or SIGHUP while torch loads: one line, not a traceback (main() takes them over)."""
    name = signal.Signals(signum).name
    print(f"{name}: interrupted before training started; nothing to save", file=sys.stderr)
    os._exit(128 + signum)


if __name__ == "__main__":
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # (Windows has no SIGHUP)
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), quit_quietly)
# short OpenMP spinning: a core that another program uses costs its share, not every op (REPORT sec. 3.10)
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
import argparse
import contextlib
import copy
import dataclasses
import functools
import math
import shlex
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import autoencoder
import budget
import control
import data
import settings
import text as texts
import unet
import util
from budget import Plan
from diffusion import Denoising, GaussianDiffusion
from settings import replace
from util import UsageError, fmt_bytes, fmt_time, plural

ERRORS = (UsageError, util.WriteError, util.CheckpointError, data.DataError)  # bad input
SMALLER = "use a smaller --size, --ch or --batch-size"
NETWORKS = dict(unet=unet.check_weights, autoencoder=autoencoder.check_weights,  # a checkpoint's networks
                control=control.check_weights)

# -----------------------------------------------------------------------------
# the run: train -> loop -> train_step, then what is due


def main(argv=None, started=None):
    with util.one_line_errors(ERRORS, "interrupted before training started; nothing to save"):
        util.stop_on_signals()  # until the loop: one line, and the --out folder as it was
        args, given = settings.make_parser().parse(argv)
        code = 0
        for i, argv in enumerate(settings.stages(args, given)):  # --latent-diffusion: two runs, else this one
            if argv is not None:
                print(f"--latent-diffusion: stage {i + 1} of 2: python train.py {shlex.join(argv)}",
                      flush=True)
                args, given = settings.make_parser().parse(argv)
            code = train(args, given, started or time.time())
            started = None  # a later stage's budget counts from its own start
            if code:
                break
    if code:
        sys.exit(code)


def train(args, given, started):
    """The phases of a run. -> exit code."""
    cfg, env, ckpt, stage = setup(args, given, started)  # and every check that needs no data
    try:
        if cfg.bench:
            return bench(cfg, env, stage)
        if cfg.download and env.master:
            try:
                data.select(cfg.data)
            except data.DataError:
                data.download(cfg.data, env.say)
        fit = cfg.minutes and not ckpt and not cfg.dry_run and not given & {"ch", "batch_size"}
        if fit and stage.narrows:
            cfg = fit_model_to_minutes(cfg, env, given, stage)
        faces, data_id = load_split(cfg, env, ckpt, stage)
        if stage.latent:  # the training set: the autoencoder's latents of the images (and the scale factor)
            faces, stage.first = encode_split(cfg, env, ckpt, faces, stage.first)
        condition = None  # a text run's of the validation images
        if cfg.text:  # captions: a folder's own, or sentences made from CelebA's attributes
            faces, condition = stage.captions(cfg, faces, ckpt, env.say)
        val = None
        if env.master and cfg.eval_every > 0:  # the first --eval-images validation images (or their latents)
            val = data.validation_set(cfg.data, cfg.size, cfg.crop, cfg.cache_dir, cfg.eval_images, cfg.attrs,
                                      stage.first.encode, env.device, env.say, condition)
        run = build(cfg, env, ckpt, stage, faces, val, data_id, given)
        if run.step >= run.plan.total:
            env.say(f"nothing to do: the checkpoint is at step {run.step}, where the run ends; raise "
                    "--max-steps or --epochs to train further")
            return 0
        # a CPU step can take minutes: a signal then cuts it short inside (after a compiled or DDP step)
        at_once = not env.ddp and env.device.type != "cuda" and not env.compile
        if at_once:
            stop_inside_steps([run.ema, run.model], env.signals)
        else:
            stop_inside_steps([run.ema], env.signals)  # the EMA's grids and evaluations
        with util.StopSignals(env.signals, env.say, at_once):
            code = loop(cfg, env, run)
        util.stop_on_signals(done=f"the run is over, its checkpoint written; exiting with code {code}")
        return code
    finally:
        if env.ddp and dist.is_initialized():
            dist.destroy_process_group()
        util.release_folder(*env.claim)


def loop(cfg, env, run):
    """[DDPM] Algorithm 1 on a global batch of cfg.batch_size images (latents in a latent run), of which this
    rank takes a shard; the objective draws t and the noise (an autoencoder's: its posterior's noise)."""
    gen = torch.Generator(device=env.device)  # re-seeded every step: all of a step's randomness
    run.model.train()
    while run.step < run.plan.total:  # line 6: until converged
        gen.manual_seed((cfg.seed * 1_000_003 + run.step) % 2**64)
        x0, attrs = run.batches.get(run.step, gen)  # line 2: x_0 ~ q(x_0), (B/world, C, H, W)
        x0 = x0.contiguous(memory_format=run.memory_format)
        losses = run.objective.losses(x0, attrs, gen)  # lines 3-4: t ~ U(0..T-1), eps ~ N(0, I)
        rng = torch.get_rng_state()  # dropout's: a step that a signal cuts short is rolled back
        try:
            loss = train_step(run, losses, lr_at(run.step, cfg.lr, run.plan))  # line 5: a gradient step
        except util.Interrupted:  # weights, optimizer and RNG stay those of run.step
            run.opt.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            return after_step(cfg, env, run, None)
        run.step += 1
        code = after_step(cfg, env, run, loss)  # progress, --minutes, evaluations, checkpoints, signals
        if code is not None:
            return code
    return 0


def train_step(run, losses, lr):
    """One AdamW step on the mean of losses(model), the per-image loss: for a DDPM L_simple = ||eps -
    eps_theta(x_t, t)||^2 ([DDPM] eq. 14). Then the EMA. -> the loss, a tensor (reading it would wait for
    the device)."""
    for group in run.opt.param_groups:
        group["lr"] = lr
    with run.ctx:  # autocast
        loss = losses(run.fwd).mean()
    run.scaler.scale(loss).backward()  # the scaler is a no-op unless fp16
    run.scaler.unscale_(run.opt)  # clipping sees the true gradient
    torch.nn.utils.clip_grad_norm_(run.params, run.grad_clip)
    run.scaler.step(run.opt)  # skipped when fp16 overflowed
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

# -----------------------------------------------------------------------------
# the stages: what a run trains, decided once in setup, which the rest asks without asking which it is


class DDPMStage:
    """A DDPM: the U-Net preset of the size of what it learns, its Denoising objective; on images, or on the
    latents of a first stage (autoencoder.FirstStage; autoencoder.Pixels for images) that it encodes and
    decodes."""
    objective = Denoising
    build = unet.UNet
    from_dict = staticmethod(unet.config_from_dict)
    narrowest = 32  # --minutes narrows it to no fewer channels
    narrows = True  # --minutes may narrow it
    widths = "--ch or --size"  # the flags that make it large

    def __init__(self, first):
        self.first = first
        self.latent = first.factor > 1
        self.name = "latent U-Net" if self.latent else "U-Net"

    def shape(self, size):
        """(C, H, W) of what the model learns from size x size images: the images, or their latents."""
        return self.first.latent_shape(size)

    def config(self, cfg, attrs=(), vocab=()):
        """The flags' network: the preset of its input's size (with its channels), the flags' overrides; a
        text model's tokenizer's words `vocab`."""
        c, h, _ = self.shape(cfg.size)
        if cfg.text and not vocab:  # a text model before its tokenizer (what the plans and --bench time)
            vocab = texts.SPECIAL
        return unet.preset(h, in_channels=c, ch=cfg.ch, ch_mult=cfg.ch_mult,
                           num_res_blocks=cfg.num_res_blocks, attn_res=cfg.attn_res, dropout=cfg.dropout,
                           attr_film=cfg.attr_film, attrs=attrs, vocab=vocab, text_dim=cfg.text_dim,
                           text_layers=cfg.text_layers, max_tokens=cfg.max_tokens)

    @staticmethod
    def narrowed(base, ch):
        """--minutes' settings of `base` at ch channels: narrowed, no dropout (REPORT sec. 3.5)."""
        return dict(ch=ch, dropout=base.dropout if ch == base.ch else 0.0)

    split = "train"  # the images it trains on
    captioned = True  # a text run reads the folder's captions (or makes CelebA's)

    def captions(self, cfg, faces, ckpt, say):
        """A text run's captions of its training images: the folder's own, or sentences of CelebA's
        attributes; the tokenizer a resumed run's, or built from them. -> (faces with their condition; the
        validation images' condition, a function of their data.load dict and count)."""
        vocab = ckpt["model_args"]["vocab"] if ckpt else None
        faces = texts.condition(faces, cfg.max_tokens, cfg.seed, vocab, say)
        return faces, functools.partial(texts.validation_condition, faces["tokenizer"], cfg.max_tokens)

    def make_objective(self, cfg, net, env, shard, rare=None):
        diffusion = GaussianDiffusion(cfg.timesteps, cfg.schedule, cfg.objective, cfg.min_snr_gamma)
        fmt = torch.channels_last if env.channels_last else torch.contiguous_format
        drop = None
        if net.vocab:  # a text model: its caption dropped whole, to the empty one
            drop = functools.partial(texts.drop, batch_size=cfg.batch_size, shard=shard,
                                     p_uncond=cfg.p_uncond)
        return self.objective(diffusion.to(env.device), self.first, self.shape(cfg.size),
                              batch_size=cfg.batch_size, shard=shard, memory_format=fmt,
                              p_uncond=cfg.p_uncond, p_drop=cfg.p_drop_attr, rare=rare,
                              sample_steps=cfg.sample_steps, seed=cfg.seed, drop=drop,
                              cond_name="text" if net.vocab else "attrs")

    def batches(self, cfg, env, faces, resident):
        """The training batches: of the images, or of the latents (scaled by the first stage's factor); a
        CelebA text run's draw new sentences of their attributes at each step."""
        caption = faces.get("caption")
        if self.latent:
            return data.LatentBatches(faces["images"], cfg.batch_size, env.device, cfg.seed, env.rank,
                                      env.world, flip=not cfg.no_flip, attrs=faces["cond"], resident=resident,
                                      scale=self.first.scale_factor, sample=cfg.posterior == "sample",
                                      caption=caption)
        return data.Batches(faces["images"], cfg.batch_size, env.device, cfg.seed, env.rank, env.world,
                            flip=not cfg.no_flip, attrs=faces["cond"], resident=resident, caption=caption)


class ControlStage(DDPMStage):
    """ControlNet (control.py): a trainable copy of a locked DDPM's encoder, steered by each image's edges; on
    the base's images or latents, with its condition. The base: its network's config (a checkpoint's
    model_args), its EMA weights (None on a resume, whose checkpoint holds them) and their CRC-32."""
    objective = control.Controlled
    from_dict = staticmethod(control.config_from_dict)
    narrows = False  # the base's width, and its batch
    name = "controlled U-Net"

    def __init__(self, first, base_args, weights, base_id):
        super().__init__(first)
        self.base_args = base_args
        self.weights = weights
        self.base_id = base_id

    def config(self, cfg, attrs=(), vocab=()):
        return control.ControlConfig(base=self.base_args, hint_size=cfg.size, base_id=self.base_id)

    def build(self, net):
        """The controlled model, its base's weights loaded and copied (on the meta device: shapes only)."""
        model = control.ControlledUNet(net)
        if self.weights is not None and not model.base.conv_in.weight.is_meta:
            model.load_base(self.weights)
        return model

    def captions(self, cfg, faces, ckpt, say):  # with the base's words
        faces = texts.condition(faces, cfg.max_tokens, cfg.seed, self.base_args["vocab"], say)
        return faces, functools.partial(texts.validation_condition, faces["tokenizer"], cfg.max_tokens)


class FinetuneStage(DDPMStage):
    """DreamBooth (text.py): a text model fine-tuned, all its weights, on every photo of one person with
    the instance prompt, and on class images that it drew before training with the class prompt. The base:
    its network's config with the prompt's new words (a checkpoint's model_args), its EMA weights grown to
    them (None on a resume)."""
    narrows = False
    split = "all"  # every photo of the person trains; there is no validation
    captioned = False  # its captions are the instance prompt
    name = "fine-tuned U-Net"

    def __init__(self, first, base_args, weights):
        super().__init__(first)
        self.base_args = base_args
        self.weights = weights

    def config(self, cfg, attrs=(), vocab=()):
        return unet.config_from_dict(self.base_args)

    def build(self, net):
        """The base's network with its weights (on the meta device: shapes only)."""
        model = unet.UNet(net)
        if self.weights is not None and not model.conv_in.weight.is_meta:
            model.load_state_dict(self.weights)
        return model

    def captions(self, cfg, faces, ckpt, say):
        """Every photo's caption is the instance prompt."""
        tokenizer = texts.Tokenizer(self.base_args["vocab"])
        tokens = tokenizer.batch([cfg.instance_prompt] * len(faces["images"]), cfg.max_tokens)
        say(f"dreambooth: {plural(len(faces['images']), 'photo')} captioned {cfg.instance_prompt!r}")
        return dict(faces, cond=tokens, caption=None, tokenizer=tokenizer, vocab=tokenizer.vocab), None

    def make_objective(self, cfg, net, env, shard, rare=None):
        """[DB]'s: the class images drawn once by the model as it starts (kept in --out for a resume)."""
        plain = super().make_objective(cfg, net, env, shard, rare)
        tokenizer = texts.Tokenizer(net.vocab)
        class_tokens = tokenizer.batch([cfg.class_prompt], cfg.max_tokens)[0]
        class_x0 = class_images(cfg, env, self, net, plain.diffusion, class_tokens)
        instance_tokens = tokenizer.batch([cfg.instance_prompt], cfg.max_tokens)[0]
        return texts.PriorPreservation(
            plain.diffusion, self.first, self.shape(cfg.size), batch_size=cfg.batch_size, shard=shard,
            memory_format=plain.memory_format, p_uncond=0, sample_steps=cfg.sample_steps, seed=cfg.seed,
            cond_name="text", class_x0=class_x0, class_tokens=class_tokens,
            instance_tokens=instance_tokens, prior_weight=cfg.prior_weight)


class HintStage(DDPMStage):
    """A ControlNet's baseline (--hint-concat): a DDPM trained from scratch that reads each image's edge map
    as more input channels, concatenated to x_t (pixel-unshuffled to a latent model's grid)."""
    objective = control.Controlled
    name = "U-Net with a hint"

    def config(self, cfg, attrs=(), vocab=()):
        net = super().config(cfg, attrs, vocab)
        return dataclasses.replace(net, hint_channels=self.first.factor ** 2)


class AutoencoderStage:
    """Latent diffusion's first stage: the autoencoder the flags describe, its Reconstruction objective, on
    the images."""
    objective = autoencoder.Reconstruction
    build = autoencoder.Autoencoder
    from_dict = staticmethod(autoencoder.config_from_dict)
    narrowest = 16
    narrows = True
    split = "train"
    captioned = False
    widths = "--ch, --z-channels or --size"
    name = "autoencoder"
    latent = False

    def __init__(self, first):
        self.first = first  # autoencoder.Pixels: it learns the images

    def shape(self, size):
        return (3, size, size)

    def config(self, cfg, attrs=(), vocab=()):
        return autoencoder.AutoencoderConfig(
            image_size=cfg.size, factor=cfg.factor, z_channels=cfg.z_channels,
            ch=cfg.ch or autoencoder.AutoencoderConfig.ch,
            num_res_blocks=cfg.num_res_blocks or autoencoder.AutoencoderConfig.num_res_blocks,
            mid_attn=not cfg.no_mid_attn)

    @staticmethod
    def narrowed(base, ch):
        return dict(ch=ch)

    def make_objective(self, cfg, net, env, shard, rare=None):
        return autoencoder.Reconstruction(net, batch_size=cfg.batch_size, shard=shard,
                                          kl_weight=cfg.kl_weight)

    def batches(self, cfg, env, faces, resident):
        return data.Batches(faces["images"], cfg.batch_size, env.device, cfg.seed, env.rank, env.world,
                            flip=not cfg.no_flip, attrs=faces["cond"], resident=resident)


def network(cfg, ckpt, stage, attrs=(), vocab=()):
    """The network's config: the checkpoint's on a resume, else the one the flags describe."""
    if ckpt:
        return stage.from_dict(ckpt["model_args"])
    return stage.config(cfg, attrs, vocab)


def config_dict(net):
    """A network's config as a checkpoint stores it (plain lists and numbers)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(net).items()}

# -----------------------------------------------------------------------------
# what is due now and then: the --minutes plan, progress lines, validation, grids, checkpoints


def after_step(cfg, env, run, loss):
    """What is due after a step (loss None: one cut short): the --minutes plan and deadline, a progress line,
    the CPU's threads, the validation loss and grid, the checkpoint. -> the exit code, or None."""
    stop = stop_signal(env)
    if loss is not None:
        run.loss_sum = run.loss_sum + loss
        run.loss_n += 1
        if run.minutes:  # --minutes: times the first steps and plans, then ends where the budget is spent
            run.plan = run.minutes.after_step(run.step, run.plan, stop)
    last = run.step >= run.plan.total
    if loss is not None and (run.step % cfg.log_every == 0 or last or stop or run.step in (1, 10)):
        now = time.time()
        rate = (run.step - run.step_log) / max(now - run.t_log, 1e-9)  # steps/s since the last line
        if run.minutes:  # the machine got slower or faster: the end moves
            run.plan = run.minutes.followed(run.step, run.plan, rate)
        progress(cfg, env, run, rate)
        if run.step % cfg.log_every == 0:  # the loss column averages the steps since the last multiple
            run.loss_sum = torch.zeros((), device=env.device)
            run.loss_n = 0
        run.t_log = now
        run.step_log = run.step
        if env.threads:
            env.threads.recheck(now)  # other programs came or went
    t0 = time.time()
    if not stop and env.master and (val_due(cfg, run, last) or grid_due(cfg, run, last)):
        grid_s = evaluate(cfg, env, run, last)  # -> the grid's seconds per image and evaluation, or None
        if grid_s is not None and run.minutes:  # --minutes prices grids and validation by this time
            run.minutes.grid_drawn(run.step, grid_s)
    if (cfg.ckpt_every and run.step % cfg.ckpt_every == 0) or last or stop:
        save(cfg, env, run, last, stop)
    run.t_log += time.time() - t0  # not training time
    if stop:
        return 128 + stop  # the shell's code for a death by that signal
    return None


def progress(cfg, env, run, rate):
    """A progress line and a row of log.csv, the loss averaged since the last; a loss that is not finite ends
    the run. Every rank calls it: the loss is the mean over the ranks."""
    loss = budget.mean_over_ranks(run.loss_sum) / run.loss_n
    if not math.isfinite(loss):
        path = os.path.join(cfg.out, "ckpt.pt")
        kept = "nothing was saved"
        if os.path.exists(path):
            kept = f"the last good checkpoint {path} was kept"
        raise SystemExit(f"error: the loss became {loss} by step {run.step}: training diverged; {kept}. "
                         "Lower --lr, raise --warmup, or use --precision bf16/fp32.")
    epoch = run.step // run.batches.steps_per_epoch
    lr = run.opt.param_groups[0]["lr"]
    total = "?" if math.isinf(run.plan.total) else run.plan.total
    eta = "timing the first steps"
    if math.isfinite(run.plan.total):
        eta = fmt_time((run.plan.total - run.step) / max(rate, 1e-9))
    env.say(f"epoch {epoch} | step {run.step}/{total} | loss {loss:.4f} | {rate * cfg.batch_size:,.1f} img/s "
            f"| lr {lr:.2e} | ETA {eta}")
    log_row(run, loss=f"{loss:.6f}", lr=f"{lr:.3e}", img_per_s=f"{rate * cfg.batch_size:.1f}")


def evaluate(cfg, env, run, last):
    """Rank 0: the validation loss and the fixed-noise sample grid when due (a signal cuts them short). -> the
    grid's seconds per image and model evaluation, or None where none was drawn."""
    grid_s = None
    try:
        if val_due(cfg, run, last):
            vl, psnr = val_loss(cfg, env, run)
            line = f"step {run.step} | val loss {vl:.4f} ({plural(len(run.val[0]), 'image')}, EMA weights)"
            if psnr is not None:
                line += f", reconstruction PSNR {psnr:.2f} dB"
            env.say(line)
            log_row(run, val_loss=f"{vl:.6f}")
        if grid_due(cfg, run, last):
            t0 = time.time()
            path, evals = sample_grid(cfg, env, run)
            grid_s = (time.time() - t0) / evals
            env.say(f"step {run.step} | samples {path}")
    except util.Interrupted:
        env.say(f"step {run.step} | evaluation or sample grid cut short by the signal")
    return grid_s


def val_due(cfg, run, last):
    """A validation loss every --eval-every steps and at the end, where there are validation images."""
    return run.val is not None and (run.step % cfg.eval_every == 0 or last)


def grid_due(cfg, run, last):
    """A grid at grid_from + k * grid_every, and at the end (a dry run's too)."""
    every = run.plan.grid_every
    if last:
        return every > 0 or cfg.dry_run
    return every > 0 and run.step >= run.plan.grid_from and (run.step - run.plan.grid_from) % every == 0


def log_row(run, **values):
    """A row of log.csv (rank 0)."""
    if run.log:
        run.log(step=run.step, epoch=run.step // run.batches.steps_per_epoch,
                elapsed_s=f"{time.time() - run.t0:.1f}", **values)


def sample_grid(cfg, env, run):
    """The objective's grid of the EMA model (a DDPM's samples, an autoencoder's reconstructions), written to
    --out. -> (its path, the model evaluations it made)."""
    def examples():  # what an autoencoder reconstructs: the validation images, or a training batch
        if run.val is not None:
            return run.val[0]
        return run.batches.get(0, torch.Generator(env.device))[0]
    shown = util.Progress(cfg.sample_n * run.objective.grid_evals, "sample grid", "image-steps", env.say,
                          last=False)
    x, nrow, evals = run.objective.grid(run.ema, examples, cfg.sample_n, cfg.batch_size // env.world, run.ctx,
                                        shown)
    path = os.path.join(cfg.out, f"samples_{run.step:07d}.png")
    util.save_image(data.to_uint8(x), path, "--out", nrow=nrow)
    return path, evals


@torch.no_grad()
def val_loss(cfg, env, run):
    """The loss of the EMA weights on the validation images, with the same t and noise every time. -> (the
    loss, an autoencoder's reconstruction PSNR or None)."""
    images, attrs = run.val
    g = torch.Generator(device=env.device).manual_seed(0)
    b = cfg.batch_size // env.world
    losses = []
    psnrs = []
    for i in range(0, len(images), b):
        cond = None
        if attrs is not None:
            cond = attrs[i:i + b]
        loss, psnr = run.objective.val_losses(run.ema, images[i:i + b], cond, g, run.ctx)
        losses.append(loss)
        if psnr is not None:
            psnrs.append(psnr)
    psnr = torch.cat(psnrs).mean().item() if psnrs else None
    return torch.cat(losses).mean().item(), psnr


def stop_signal(env):
    """The signal that stops the run, agreed by every rank, or None. A closed terminal also fails the writes
    to stdout: its SIGHUP is the one cause."""
    if not budget.on_any_rank(env.signals, env.ctrl):
        return None
    if util.SIGHUP in env.signals:
        return util.SIGHUP
    if env.signals:
        return env.signals[0]
    return signal.SIGTERM  # another rank's signal


def save(cfg, env, run, last, stop):
    """The checkpoint, written by rank 0, and what goes with it."""
    loss_sum = budget.mean_over_ranks(run.loss_sum)  # on every rank; a resume continues it
    if not env.master:
        return
    path = os.path.join(cfg.out, "ckpt.pt")
    run.elapsed = time.time() - run.t0
    t0 = time.time()
    saved = True  # a signal right after a periodic checkpoint: that one is this step's
    if run.saved_at != run.step:
        saved = checkpoint(cfg, env, run, path, loss_sum)
        run.saved_at = run.step
    if run.minutes:
        run.minutes.save_s = time.time() - t0  # --minutes keeps this much for the last one
    took = fmt_time(time.time() - env.t_start)
    env.say(f"step {run.step} | " + (f"checkpoint {path}" if saved else "weights not finite: not saved"))
    if last and run.minutes:
        env.say(f"--minutes {cfg.minutes:g}: the run took {took} from start to this checkpoint")
    if last and cfg.dry_run:
        env.say(f"dry run: the setup works ({took}; a checkpoint of {fmt_bytes(os.path.getsize(path))})")
    if stop:
        line = f"interrupted by {util.signal_name(stop)} at step {run.step}"
        if saved:
            line += ("; checkpoint written. Continue with: python train.py --resume --out "
                     f"{shlex.quote(cfg.out)}")
        env.say(line)
        if getattr(env.say, "lost", False):  # stdout is gone (| head); stderr may still be read
            with contextlib.suppress(OSError):
                print(line, file=sys.stderr, flush=True)


def checkpoint(cfg, env, run, path, loss_sum):
    """One self-describing file, written atomically; non-finite weights are not (-> False). A latent run's
    carries its first stage, so that sample.py needs this file alone."""
    sd = run.model.state_dict()
    if not all(torch.isfinite(v).all() for v in sd.values()):
        return False
    cuda_rng = None
    if env.device.type == "cuda":
        cuda_rng = torch.cuda.get_rng_state()
    ckpt = dict(
        format=util.CKPT_FORMAT, args=vars(cfg), plan=dataclasses.asdict(run.plan),
        model_args=config_dict(run.model.cfg), model=sd, ema=run.ema.state_dict(),
        optimizer=run.opt.state_dict(), scaler=run.scaler.state_dict(), step=run.step,
        epoch=run.step // run.batches.steps_per_epoch, world_size=env.world, data_id=run.data_id,
        train_images=len(run.batches.images), elapsed=run.elapsed, loss_sum=loss_sum, loss_n=run.loss_n,
        rng=dict(torch=torch.get_rng_state(), cuda=cuda_rng), **run.first.checkpoint_entries())
    util.save_checkpoint(ckpt, path)
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
    claim: tuple = (None, ())  # rank 0's lock on --out, and the folders it made
    threads: budget.Threads = None  # the CPU's threads, chosen again as other programs come and go

    @property
    def master(self):
        return self.rank == 0


@dataclass
class Run:
    """What the loop updates: the model, its EMA and optimizer, the data, the plan and the counters."""
    model: torch.nn.Module  # checkpoints take its state dict
    fwd: object  # the model as a step calls it (compiled, DDP)
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    objective: object  # what a step computes: diffusion.Denoising or autoencoder.Reconstruction
    first: object  # the first stage, which a latent run's checkpoint carries
    ctx: object
    memory_format: torch.memory_format
    grad_clip: float
    plan: Plan
    batches: data.Batches = None
    val: tuple = None  # rank 0: (validation images or latents, attributes or None)
    minutes: budget.Minutes = None  # a new --minutes run's planner
    step: int = 0
    elapsed: float = 0.0  # seconds of training, across resumes
    loss_sum: torch.Tensor = None  # summed since the last multiple of --log-every
    loss_n: int = 0
    data_id: str = None  # data.identity of the training images
    saved_at: int = -1  # the step of the checkpoint on disk, written by this process
    t0: float = 0.0  # time.time() - elapsed at the start
    t_log: float = 0.0  # when the next progress line's steps began, less evaluation time
    step_log: int = 0
    log: object = None  # rank 0: log.csv

    def __post_init__(self):  # the weights it trains (a controlled model's base is locked) and their EMA
        trained = [p.requires_grad for p in self.model.parameters()]
        self.params = [p for p, t in zip(self.model.parameters(), trained) if t]
        self.ema_params = [p for p, t in zip(self.ema.parameters(), trained) if t]

# -----------------------------------------------------------------------------
# setup: settings, processes, device, --out, the checks that need no data


def setup(args, given, started):
    """-> (cfg, env, ckpt, stage): the flags (or the checkpoint's), the processes and device, the checkpoint a
    --resume continues (or None), what the run trains."""
    ddp = "RANK" in os.environ
    rank = int(os.environ["RANK"]) if ddp else 0
    world = int(os.environ["WORLD_SIZE"]) if ddp else 1
    env = Env(ddp=ddp, rank=rank, world=world, local_world=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
              t_start=started, out=args.out)
    if env.master:  # rank 0 prints; once stdout is gone, into --out/stdout.log, and the run stops
        env.say = util.Say(functools.partial(stdout_log, env), functools.partial(stdout_lost, env))
    else:
        env.say = lambda *a, **k: None
    ckpt = None
    cfg = argparse.Namespace(**vars(args))
    if args.resume:
        ckpt, path = open_resume(args)
        cfg = settings.resumed(args, given, ckpt, path)
        env.say(f"resuming from {path} at step {ckpt['step']}")
    first = autoencoder.Pixels()
    if ckpt and "autoencoder" in ckpt:  # a latent run carries its autoencoder
        first = autoencoder.FirstStage.from_checkpoint(ckpt)
    elif cfg.latents:
        first, trained = open_autoencoder(cfg, given)
        cfg = replace(cfg, size=trained["size"], crop=trained["crop"])  # the run takes its autoencoder's
    if cfg.control:  # a ControlNet on a trained DDPM (a resume's checkpoint holds its base)
        cfg, stage = open_base(cfg, given, ckpt, first, env.say)
    elif cfg.finetune:  # DreamBooth on a trained text model
        cfg, stage = open_finetune(cfg, given, ckpt, first, env.say)
    elif cfg.autoencoder:
        stage = AutoencoderStage(first)
    elif cfg.hint_concat:
        stage = HintStage(first)
    else:
        stage = DDPMStage(first)
    check_args(cfg, given, env, ckpt, stage)
    minutes = cfg.minutes and not cfg.resume
    cfg = replace(cfg, data=os.path.abspath(cfg.data), out=os.path.abspath(cfg.out))
    if minutes and "lr_decay" not in given:
        cfg = replace(cfg, lr_decay="cosine")  # ends at 0
    if minutes and "sample_every" not in given:
        cfg = replace(cfg, sample_every=None)  # four grids over the run, once it is planned
    cfg = replace(cfg, sample_steps=min(cfg.sample_steps, cfg.timesteps))
    if cfg.dry_run:  # quick at any size
        cfg = replace(cfg, batch_size=world, sample_steps=min(cfg.sample_steps, 2), sample_n=1, eval_images=2)
    device = budget.pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)), env.local_world)
    cuda = device.type == "cuda"
    env.out = cfg.out
    env.device = device
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        env.ctrl = dist.new_group(backend="gloo") if cuda else None  # agreeing never waits for the GPU
    env.precision, env.ctx, env.compile, env.channels_last = budget.step_settings(
        device, cfg.precision, cfg.compile, cfg.channels_last, cfg.dry_run)
    net = network(cfg, ckpt, stage)
    with torch.device("meta"):  # shapes only: no memory, no time
        params = stage.build(net).num_params()
    budget.check_fits(params, net, device, f"use a smaller {stage.widths}")
    if cfg.seed is None:  # rank 0's: every rank shuffles alike
        seed = int.from_bytes(os.urandom(4), "little") % 2**31
        cfg = replace(cfg, seed=int(budget.from_rank0(seed, env.ctrl)))
    torch.manual_seed(cfg.seed + rank)  # dropout; the rest comes from a generator per step
    # a latent run's autoencoder, built after the seed (its random init comes before the U-Net's)
    stage.first.to(device, budget.to_channels_last if env.channels_last else None)
    env.threads = budget.Threads(device, env.local_world, env.say)
    threads = ""
    if device.type == "cpu":
        threads = f" ({plural(env.threads.count, 'thread')})"
    env.say(f"device {device} x {plural(world, 'process', 'processes')}{threads}, {env.precision}, compile "
            f"{env.compile}, channels_last {env.channels_last}, seed {cfg.seed}")
    if not cfg.bench:
        env.claim = claim_out(cfg, env)
    return cfg, env, ckpt, stage


def stdout_log(env):
    """Where rank 0's lines go once stdout is gone: --out/stdout.log (None before the folder exists)."""
    return os.path.join(env.out, "stdout.log") if os.path.isdir(env.out) else None


def stdout_lost(env):
    """stdout failed: the run stops as on a signal (unless one already stops it: a closed terminal's
    SIGHUP)."""
    if not env.signals:
        env.signals.append(util.SIGPIPE)


def open_resume(args):
    """--resume: the checkpoint it continues, with the state a resume needs. -> (it, its path)."""
    if args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: drop one of them")
    path = os.path.join(args.out, "ckpt.pt") if args.resume == "latest" else args.resume
    if args.resume == "latest" and not os.path.exists(path) and os.path.isdir(args.out):
        util.release_folder(*util.claim_folder(args.out, "--out"))  # a live run's folder is in use: say so
        held = [f for f in sorted(os.listdir(args.out)) if f in ("log.csv", "stdout.log")]
        if held:
            raise UsageError(f"--out {args.out} holds no checkpoint to resume ({', '.join(held)} of a run "
                             "that stopped before its first); start that run again with --overwrite, or pick "
                             "another --out")
    ckpt = util.load_checkpoint(path, networks=NETWORKS)
    if not all(k in ckpt for k in ("args", "optimizer", "scaler")):
        raise util.CheckpointError(f"{path} lacks the optimizer state that a resume needs; sample from it "
                                   "with sample.py, or start a new run")
    planned = (ckpt.get("plan") or {}).get("total", math.inf)
    if ckpt["step"] > planned:
        raise util.CheckpointError(f"{path}: its step {ckpt['step']:,} is beyond the {planned:,} steps its "
                                   "run planned; the file was edited or damaged: use another copy")
    return ckpt, path


def open_autoencoder(cfg, given):
    """--latents PATH: the autoencoder whose latents the run learns, as its first stage (the scale factor
    comes once its latents are encoded). It is fully convolutional: a run may take another --size that its
    factor divides (by default the autoencoder's), but not another crop. -> (it, the run's size and crop)."""
    path = cfg.latents
    ckpt = util.load_checkpoint(path, parts=("ema",), networks=NETWORKS)
    a = ckpt["args"]
    if not a.get("autoencoder"):
        raise UsageError(f"--latents {path} is a diffusion model's checkpoint, not an autoencoder's; pass "
                         "the ckpt.pt of a train.py --autoencoder run")
    net = autoencoder.config_from_dict(ckpt["model_args"])
    if "crop" in given and cfg.crop != a["crop"]:
        raise UsageError(f"--crop {cfg.crop}: the autoencoder {path} was trained with --crop "
                         f"{a['crop']}, and a latent run takes its autoencoder's; drop --crop, or train an "
                         f"autoencoder with --crop {cfg.crop}")
    size = a["size"]
    if "size" in given:
        size = cfg.size
    if size % net.factor:
        raise UsageError(f"--size {size}: the autoencoder {path} (f = {net.factor}) encodes sizes its factor "
                         f"divides; use a multiple of {net.factor}")
    source = dict(path=os.path.abspath(path), id=f"{util.tensor_crc(ckpt['ema']):08x}")  # its weights' CRC-32
    return autoencoder.FirstStage(net, ckpt["ema"], None, source), dict(size=size, crop=a["crop"])


def open_base(cfg, given, ckpt, first, say):
    """--control BASE: the DDPM that a control run steers, locked, and the settings the run takes from the
    base's run (size, crop, diffusion, condition, batch, lr) where not given. A resume's checkpoint holds the
    base. -> (the settings, its ControlStage)."""
    if ckpt:
        return cfg, ControlStage(first, ckpt["model_args"]["base"], None, ckpt["model_args"]["base_id"])
    path = cfg.control
    base = util.load_checkpoint(path, parts=("ema",), networks=NETWORKS)
    a = base["args"]
    if a.get("autoencoder") or a.get("control"):
        what = "an autoencoder's" if a.get("autoencoder") else "a control run's"
        raise UsageError(f"--control {path} is {what} checkpoint; pass the ckpt.pt of a DDPM that train.py "
                         "trained (on images, or on latents)")
    taken = {k: a[k] for k in settings.FROM_BASE if k in a and k not in given}
    cfg = replace(cfg, **taken)
    if "autoencoder" in base:  # a latent base: its first stage and scale factor
        first = autoencoder.FirstStage.from_checkpoint(base)
    weights = base["ema"]
    base_id = f"{util.tensor_crc(weights):08x}"
    say(f"control: the base {path} (step {base['step']:,}, weights {base_id}), locked; it takes the base's "
        f"--size {cfg.size}, --batch-size {cfg.batch_size} and --lr {cfg.lr:g}")
    return cfg, ControlStage(first, base["model_args"], weights, base_id)


def check_args(cfg, given, env, ckpt, stage):
    """Everything that can be checked without data: a mistake costs seconds, not a decode."""
    settings.check(cfg, given, env.world)
    if cfg.lr > 1e-2 and not cfg.resume:
        env.say(f"note: --lr {cfg.lr:g} is far above what diffusion U-Nets train with: expect it to diverge")
    check_model(cfg, given, env, ckpt, stage)


def check_model(cfg, given, env, ckpt, stage):
    """The model the flags describe can be built; a size between presets says which it takes."""
    net = stage.config(cfg)
    try:
        with torch.device("meta"):  # built at no cost: the network checks its config
            stage.build(net)
    except ValueError as e:
        field_, message = e.args
        flag = "--" + field_.replace("_", "-")
        if field_ == "image_size":
            flag = "--size"
        origin = ""
        if stage.build is unet.UNet and field_ not in given and field_ != "image_size":
            origin = f" (the {preset_name(net, cfg)} preset's)"
        if field_ == "image_size" and stage.latent:
            message += f" (the {cfg.size}x{cfg.size} images' latents)"
        raise UsageError(f"{flag}{origin} {message}")
    if stage.build is unet.UNet and net.image_size not in unet.PRESETS and not ckpt:
        what = f"--size {cfg.size}"
        if stage.latent:
            what = f"the {net.image_size}x{net.image_size} latent"
        env.say(f"model: {what} takes the --size {preset_of(net.image_size)} preset (--ch, --ch-mult, "
                "--num-res-blocks, --attn-res, --dropout override it)")


def preset_name(net, cfg):
    """How a message names the U-Net preset of `net`: the --size one, or a latent one."""
    if net.image_size != cfg.size:
        return f"{preset_of(net.image_size)} latent"
    return f"--size {preset_of(net.image_size)}"


def preset_of(size):
    """The U-Net preset a size takes: its own, or the nearest below (the smallest for a smaller one)."""
    return max([s for s in unet.PRESETS if s <= size] or [min(unet.PRESETS)])


def claim_out(cfg, env):
    """--out, checked and taken: writable, without another run unless resumed (--overwrite removes it), locked
    by rank 0. -> its claim on the folder (util.claim_folder's)."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out}: is a file; give a folder for checkpoints and samples")
    if not env.master:
        return None, ()
    stale = util.check_writable(cfg.out, "--out")
    claim = util.claim_folder(cfg.out, "--out")  # first: a folder that a live run holds is that run's
    old = [f for f in sorted(os.listdir(cfg.out)) if f in ("ckpt.pt", "log.csv", "stdout.log")
           or (f.startswith("samples_") and f.endswith(".png"))]
    listed = ", ".join(old[:3]) + (", ..." if len(old) > 3 else "")
    if old and not cfg.resume and not cfg.overwrite:
        util.release_folder(*claim)
        fix = (f"continue it with python train.py --resume --out {shlex.quote(cfg.out)}, pick another --out, "
               "or pass --overwrite to replace it")
        whose = "a run"
        if "ckpt.pt" not in old:  # nothing to resume
            whose = "an earlier run"
            fix = "it stopped before its first checkpoint: pass --overwrite to start again, or another --out"
        raise UsageError(f"--out {cfg.out} already holds {whose}'s files ({listed}); {fix}")
    if old and cfg.overwrite:
        for f in old:
            os.remove(os.path.join(cfg.out, f))
        env.say(f"--overwrite: removed the earlier run's {listed} from {cfg.out}")
    if stale:
        env.say(f"removed the temporary files that a killed run left in {cfg.out}")
    return claim

# -----------------------------------------------------------------------------
# data, model, optimizer, plan


def load_split(cfg, env, ckpt, stage):
    """-> (the training split's images, load()'s dict (a latent run: the split selected, to be encoded); the
    data's identity), checked against a resumed run's before anything is decoded."""
    sel = data.select(cfg.data, stage.split, log=env.say)
    n = len(sel["files"])
    data_id = data.identity(sel)
    if n < cfg.batch_size:
        raise UsageError(f"--data {cfg.data}: the train split has {plural(n, 'image')}, fewer than "
                         f"--batch-size {cfg.batch_size}; lower --batch-size")
    saved = ckpt.get("data_id") if ckpt else None
    if saved and saved != data_id and not cfg.other_data:
        theirs = ckpt["args"]["data"]
        was = plural(ckpt["train_images"], "image")
        if os.path.abspath(theirs) == cfg.data:
            raise UsageError(f"--data {cfg.data} changed since the checkpoint's run trained on it ({was} "
                             f"then, {plural(n, 'image')} now); restore those images, or pass --other-data "
                             "to continue on these")
        raise UsageError(f"--data {cfg.data} ({plural(n, 'image')}) is not the data the checkpoint's run "
                         f"trained on ({theirs}, {was}); resume with --data {shlex.quote(theirs)}, or pass "
                         f"--other-data to continue on {cfg.data}")
    if cfg.text and stage.captioned:  # the captions' refusals come before anything is decoded
        texts.captions_of(sel)
    if env.master and not (ckpt or cfg.minutes or cfg.dry_run) and env.device.type != "cuda":
        estimate_run(cfg, env, stage, n)
    if stage.latent:  # its images stream through the encoder (encode_split): no pixels held here
        return sel, data_id
    if env.ddp and not env.master:
        dist.barrier()  # rank 0 writes the caches first, the others load them
    faces = data.load(cfg.data, cfg.size, stage.split, cfg.crop, cfg.cache_dir, log=env.say, attrs=cfg.attrs,
                      sel=sel)
    if env.ddp and env.master:
        dist.barrier()
    return faces, data_id


def estimate_run(cfg, env, stage, n_images):
    """A new CPU or MPS run, before decoding: how long it takes (past a day: the 30-minute command)."""
    steps = cfg.max_steps or cfg.epochs * (n_images // cfg.batch_size)
    build = functools.partial(stage.build, stage.config(cfg))
    shape = stage.shape(cfg.size)
    step_time = functools.partial(budget.time_step, build, stage.objective.probe_losses, shape,
                                  device=env.device, ctx=env.ctx, fix=SMALLER)
    hint = ("For faces on this machine in 30 minutes: python train.py --data "
            f"{shlex.quote(cfg.data)} --size 32 --minutes 30")
    line = budget.estimate_run(steps, cfg.batch_size // env.world, step_time, env.device, hint)
    if stage.latent:  # and once, the latents of the images and their mirror images
        image = (3, cfg.size, cfg.size)
        encode = budget.time_forward(stage.first.model.encode, image, 8, env.device, env.ctx)
        views = 1 if cfg.no_flip else 2
        line += (f"; the first run also encodes {n_images:,} images x {views} views once, about "
                 f"{fmt_time(encode * n_images * views)}")
    env.say(line)


def build(cfg, env, ckpt, stage, faces, val, data_id, given):
    """The Run: the model, its objective, the memory plan, the batches, the plan and the log."""
    attrs = ()
    if faces["cond_names"]:
        attrs = tuple(faces["cond_names"])
    shape = stage.shape(cfg.size)
    net = network(cfg, ckpt, stage, attrs, faces.get("vocab", ()))
    if tuple(getattr(net, "attrs", ())) != attrs:
        raise UsageError(f"the checkpoint's model is conditioned on {','.join(net.attrs) or 'nothing'}, "
                         f"--data {cfg.data} on {','.join(attrs) or 'nothing'}; resume with the run's data")
    shard = slice(env.rank * cfg.batch_size // env.world, (env.rank + 1) * cfg.batch_size // env.world)
    rare = None  # each attribute's rarer state, for --p-drop-attr balanced
    if cfg.attrs:
        rare = (faces["cond"].float().mean(0) < 0.5).to(env.device, torch.uint8)
    objective = stage.make_objective(cfg, net, env, shard, rare)
    run = make_run(cfg, env, ckpt, stage, net, objective)
    resident = data.fits_on_gpu(faces["images"].nbytes, env.device)
    resident_bytes = faces["images"].nbytes if resident else 0
    run.model.grad_checkpoint = budget.plan_memory(  # activation checkpointing, if the batch needs it
        run.model, objective.probe_losses, shape, cfg.batch_size, env.world, env.ddp, cfg.grad_checkpoint,
        env.device, env.ctx, env.say, functools.partial(batch_fix, cfg, env), resident_bytes)
    run.batches = stage.batches(cfg, env, faces, resident)
    run.plan = make_plan(cfg, ckpt, run.step, run.batches.steps_per_epoch, given, env.say)
    run.val = val
    run.data_id = data_id
    if cfg.minutes and not ckpt:  # the planner of a new --minutes run
        val_evals = 0
        if val is not None:
            val_evals = objective.val_passes * len(val[0])
        grid_batch = min(cfg.sample_n, cfg.batch_size // env.world)
        time_forward = functools.partial(budget.time_forward, functools.partial(objective.forward, run.ema),
                                         shape, grid_batch, env.device, env.ctx)
        run.minutes = budget.Minutes(
            minutes=cfg.minutes, t_start=env.t_start, settings=cfg, params=run.model.num_params(),
            steps_per_epoch=run.batches.steps_per_epoch, grid_evals=objective.grid_evals, val_evals=val_evals,
            face_steps=objective.face_steps, time_forward=time_forward, device=env.device,
            label=lambda m: f"--minutes {m:g}", say=env.say, master=env.master, group=env.ctrl)
    steps = "planned once timed" if math.isinf(run.plan.total) else f"{run.plan.total:,}"
    short = run.plan.warmup < cfg.warmup and not (ckpt or cfg.dry_run) and math.isfinite(run.plan.total)
    env.say(f"data: {len(faces['images']):,} training images, {run.batches.steps_per_epoch:,} steps per "
            f"epoch at batch {cfg.batch_size}; steps: {steps}, lr warm-up {run.plan.warmup:,}"
            + (f" (--warmup {cfg.warmup} is more than a tenth of the run)" if short else ""))
    if env.master:  # each step once: a resume keeps the rows up to its step
        resumed_at = run.step if ckpt else None
        run.log = util.CsvLog(os.path.join(cfg.out, "log.csv"), ["step", "epoch", "loss", "val_loss", "lr",
                         "img_per_s", "elapsed_s"], resumed_at, "--out")
    run.t0 = time.time() - run.elapsed
    run.t_log = run.t0
    run.step_log = run.step
    return run


def batch_fix(cfg, env, fit):
    """What to do about a batch that does not fit the memory, where one of `fit` images would (0: not even
    one image per process)."""
    hint = "use a smaller --size or --ch"
    if fit >= env.world:
        hint = f"use --batch-size {fit} or less"
    if cfg.grad_checkpoint == "off":
        hint += ", or --grad-checkpoint auto"
    return hint


def make_run(cfg, env, ckpt, stage, net, objective):
    """Model, EMA, AdamW, GradScaler (the checkpoint's on resume). -> Run, without data."""
    device = env.device
    model = stage.build(net).to(device)
    if env.channels_last:
        budget.to_channels_last(model)
        if env.ddp:
            budget.match_gradient_strides(model, objective.probe_losses, stage.shape(cfg.size), device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay,
                            fused=fused_adamw(device))
    scaler = torch.amp.GradScaler(device.type, enabled=env.precision == "fp16")
    fwd = torch.compile(model) if env.compile else model  # state dicts from `model`: no _orig_mod.
    if env.ddp:
        fwd = DDP(fwd, device_ids=[device.index] if device.type == "cuda" else None)
    fmt = torch.channels_last if env.channels_last else torch.contiguous_format
    run = Run(model=model, fwd=fwd, ema=ema, opt=opt, scaler=scaler, objective=objective, first=stage.first,
              ctx=env.ctx, memory_format=fmt, grad_clip=cfg.grad_clip, plan=Plan(math.inf, cfg.warmup,
              cfg.lr_decay, cfg.ema_decay), loss_sum=torch.zeros((), device=device))
    if ckpt:
        restore(ckpt, model, ema, opt, scaler)
        if ckpt.get("world_size") == env.world:  # dropout continues exactly
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and ckpt["rng"]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
        else:
            torch.manual_seed(cfg.seed + env.rank + ckpt["step"])
        run.step = ckpt["step"]
        run.elapsed = ckpt.get("elapsed", 0.0)
        run.loss_n = ckpt.get("loss_n", 0)
        run.loss_sum += ckpt.get("loss_sum", 0.0)
    env.say(f"model: {model.num_params() / 1e6:.2f}M parameters, {net}")
    return run


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


def fused_adamw(device):
    """Whether AdamW runs fused (the whole update in a few kernels): on GPUs."""
    return device.type == "cuda"


def make_plan(cfg, ckpt, step, steps_per_epoch, given, say):
    """The schedule of the run's steps; a resume keeps the warm-up and EMA decay (and a --minutes run its
    end). A resume that moves the end says where it is no longer the run that it would have been
    uninterrupted: its warm-up was a tenth of the old length, or its cosine decay ends elsewhere."""
    saved = ckpt.get("plan") if ckpt else None
    if cfg.dry_run:
        total = step + 2
    elif cfg.max_steps:
        total = cfg.max_steps
    elif saved and cfg.minutes and "epochs" not in given:
        total = saved["total"]
    elif cfg.minutes:
        total = math.inf  # until the --minutes planner has measured the speed
    else:
        total = steps_per_epoch * cfg.epochs
    plan = budget.schedule(total, cfg.warmup, cfg.lr_decay, cfg.ema_decay, cfg.sample_every, saved)
    fresh = budget.schedule(total, cfg.warmup, cfg.lr_decay, cfg.ema_decay, cfg.sample_every)
    if saved and total != saved["total"] and (fresh.warmup != plan.warmup or cfg.lr_decay == "cosine"):
        was = f"{saved['total']:,}" if math.isfinite(saved["total"]) else "its --minutes end"
        differs = (f"its lr warm-up stays {plural(plan.warmup, 'step')} (one of {total:,} steps would warm "
                   f"up for {fresh.warmup:,})")
        if cfg.lr_decay == "cosine":
            differs = f"its cosine decay now ends at step {total:,}, from the lr it has"
        say(f"note: the run now ends at step {total:,}, not {was}: {differs}; the weights will differ from a "
            f"run planned for {total:,} steps from the start")
    return plan


def fit_model_to_minutes(cfg, env, given, stage):
    """--minutes without --ch or --batch-size: the preset's width and batch, halved together until
    budget.MIN_STEPS fit the budget, but only to a model faster per image (and not below the stage's
    narrowest); the lr is scaled by the width ratio, unless --lr is given (REPORT sec. 3.5)."""
    shape = stage.shape(cfg.size)
    base = stage.config(cfg)
    widths = [(base.ch >> k, cfg.batch_size >> k) for k in range(4)
              if base.ch >> k >= stage.narrowest and cfg.batch_size >> k >= 8 * env.world]

    def seconds_per_step(i):
        ch, b = widths[i]
        net = dataclasses.replace(base, **stage.narrowed(base, ch))
        return budget.time_step(functools.partial(stage.build, net), stage.objective.probe_losses, shape,
                                b // env.world, env.device, env.ctx, SMALLER)

    chosen, why = budget.fit_width(cfg.minutes, widths, seconds_per_step, env.device, env.compile)
    ch, b = widths[int(budget.from_rank0(chosen, env.ctrl))]
    changes = stage.narrowed(base, ch)
    others = "".join(f" --{k} {v:g}" for k, v in changes.items() if k != "ch")
    env.say(f"--minutes {cfg.minutes:g}: --ch {ch} --batch-size {b}{others} of "
            f"{', '.join(f'{c}/{bb}' for c, bb in widths)} (channels/batch): {why}")
    lr = cfg.lr
    if "lr" not in given:
        lr = cfg.lr * base.ch / ch  # the preset's width over the model's
    if lr != cfg.lr:
        env.say(f"--minutes {cfg.minutes:g}: --lr {lr:g}, {cfg.lr:g} times {base.ch}/{ch}")
    return replace(cfg, batch_size=b, lr=lr, **changes)

# -----------------------------------------------------------------------------
# latents: a latent run's training set is the autoencoder's encoding of the images, cached once


def encode_split(cfg, env, ckpt, sel, first):
    """The training set of a latent run: the autoencoder's latents of the images (and of their mirror images,
    unless --no-flip), from the latent cache or encoded now. A new --minutes run gives the encoding at most
    budget.ENCODE_SHARE of what is left of the budget and trains on the random part of the split that it
    encodes; a resume takes the part its run trained on. -> (data.encode_latents' dict; the first stage, with
    the scale factor of its latents on a new run)."""
    fmt = torch.channels_last if env.channels_last else torch.contiguous_format

    def encode(x):  # in float32, as every use of the first stage
        posterior = first.model.encode(x.contiguous(memory_format=fmt))
        return posterior.mean, posterior.logvar
    count = None  # images, default all
    seconds = math.inf
    if ckpt:
        count = ckpt["train_images"]
    elif cfg.dry_run:
        count = cfg.batch_size
    elif cfg.minutes:
        seconds = budget.encoding_seconds(cfg.minutes, env.t_start)
    if env.ddp and not env.master:
        dist.barrier()  # rank 0 encodes, the others read what it wrote
        count = int(budget.from_rank0(0))
    faces = data.encode_latents(cfg.data, cfg.size, cfg.crop, cfg.cache_dir, encode, first.source["id"],
                                flip=not cfg.no_flip, logvar=cfg.posterior == "sample", count=count,
                                seconds=seconds, device=env.device, log=env.say, attrs=cfg.attrs, sel=sel,
                                source=first.source["path"])
    faces["images"] = faces.pop("latents")
    if env.ddp and env.master:
        dist.barrier()
        budget.from_rank0(len(faces["images"]))
    if first.scale_factor is not None:  # a resume keeps its own
        return faces, first
    scale = autoencoder.scale_factor_of(*faces["stats"])
    env.say(f"latents: scale factor {scale:.4f} (1 / the standard deviation of the {cfg.posterior}s of "
            "q(z | x))")
    return faces, first.with_scale(scale)

# -----------------------------------------------------------------------------
# DreamBooth: the base a fine-tuning run starts from, and the class images of its prior


def open_finetune(cfg, given, ckpt, first, say):
    """--finetune BASE: the text model that a DreamBooth run fine-tunes, its vocabulary grown by the instance
    prompt's new words, and the settings the run takes from the base's run (size, crop, diffusion, text)
    where not given; a batch of the photos (at most the base's), and a tenth of the base's lr ([DB]'s low
    rate). A resume's checkpoint holds the grown model. -> (the settings, its FinetuneStage)."""
    if ckpt:
        return cfg, FinetuneStage(first, ckpt["model_args"], None)
    path = cfg.finetune
    base = util.load_checkpoint(path, parts=("ema",), networks=NETWORKS)
    a = base["args"]
    if a.get("autoencoder") or a.get("control") or not base["model_args"].get("vocab"):
        raise UsageError(f"--finetune {path} is not a text model's checkpoint; DreamBooth fine-tunes a model "
                         "trained with --text (its prompts name the person)")
    taken = {k: a[k] for k in settings.FROM_BASE[:-2] if k in a and k not in given}
    cfg = replace(cfg, **taken)
    photos = len(data.select(cfg.data, "all", log=lambda *_: None)["files"])
    if "batch_size" not in given:
        cfg = replace(cfg, batch_size=max(1, min(photos, a["batch_size"])))
    if "lr" not in given:
        cfg = replace(cfg, lr=a["lr"] / 10)
    cfg = replace(cfg, eval_every=0)  # no validation images: every photo trains
    if "autoencoder" in base:  # a latent base: its first stage and scale factor
        first = autoencoder.FirstStage.from_checkpoint(base)
    vocab = base["model_args"]["vocab"]
    unknown = [w for w in texts.words(cfg.class_prompt) if w not in vocab]
    if unknown:
        say(f"note: --class-prompt {cfg.class_prompt!r}: the model does not know "
            f"{', '.join(map(repr, unknown))}: its class images follow the other words")
    weights, vocab, new = texts.grow_vocab(base["ema"], vocab, cfg.instance_prompt)
    model_args = dict(base["model_args"], vocab=list(vocab))
    said = f"new words {', '.join(map(repr, new))}" if new else "no new words"
    say(f"dreambooth: fine-tuning {path} (step {base['step']:,}) on {plural(photos, 'photo')} of "
        f"{cfg.data} at batch {cfg.batch_size}, lr {cfg.lr:g}; {cfg.instance_prompt!r}: {said}")
    return cfg, FinetuneStage(first, model_args, weights)


def class_images(cfg, env, stage, net, diffusion, tokens):
    """The class images of prior preservation: drawn once by the model as the run starts (rank 0, its
    weights before any step) and kept in --out/class_images.pt, which a resume reads. -> (n, C, H, W) float32
    on the CPU, as the model learns them (latents for a latent model)."""
    path = os.path.join(cfg.out, "class_images.pt")
    n = 2 if cfg.dry_run else cfg.class_images
    if env.master and not (cfg.resume and os.path.exists(path)):
        if cfg.resume:
            raise util.CheckpointError(f"{path} is missing: the class images of the run it resumes; start "
                                       "the run again in a new --out")
        model = stage.build(net).to(env.device).eval()
        shown = util.Progress(n, "dreambooth: drawing the class images", "images", env.say, first=True)
        x0 = texts.draw_class_images(model, diffusion, stage.shape(cfg.size), tokens, n, cfg.seed,
                                          min(n, 64), env.device, env.ctx, stage.first.clip, shown)
        util.atomic_write(lambda tmp: torch.save(dict(prompt=cfg.class_prompt, x0=x0), tmp), path, "--out")
        env.say(f"dreambooth: {plural(n, 'class image')} of {cfg.class_prompt!r} kept in {path}")
    if env.ddp:
        dist.barrier()  # rank 0 wrote them
    return torch.load(path, weights_only=True)["x0"]

# -----------------------------------------------------------------------------
# signals: a long step, grid or evaluation cut short


def stop_inside_steps(models, signals):
    """Once a signal has arrived, each of `models` raises util.Interrupted: every block before its forward,
    every weight after its gradient. A CPU step, grid or evaluation of minutes ends within one block."""
    def check(*_):
        if signals:
            raise util.Interrupted
    for model in models:
        for block in model.blocks():
            block.register_forward_pre_hook(check)
        for p in model.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(check)

# -----------------------------------------------------------------------------
# --bench: the speed of a training step


def bench(cfg, env, stage):
    """Time training steps on synthetic data; count their FLOPs with torch.utils.flop_counter."""
    device = env.device
    b = cfg.batch_size // env.world
    shape = stage.shape(cfg.size)
    net = stage.config(cfg)
    objective = stage.make_objective(cfg, net, env, slice(env.rank * b, (env.rank + 1) * b))
    run = make_run(cfg, env, None, stage, net, objective)
    run.model.grad_checkpoint = budget.plan_memory(run.model, objective.probe_losses, shape, cfg.batch_size,
                                                   env.world, env.ddp, cfg.grad_checkpoint, device, env.ctx,
                                                   env.say, functools.partial(batch_fix, cfg, env))
    x0 = torch.rand(b, *shape, device=device) * 2 - 1
    gen = torch.Generator(device=device)

    def step():
        train_step(run, objective.losses(x0, None, gen), cfg.lr)
        run.step += 1

    flops = budget.count_flops(run.model, lambda: objective.probe_losses(run.model, x0).mean(), env.ctx)
    run.opt.zero_grad(set_to_none=True)
    warmup, line = budget.bench(step, cfg.bench_steps, flops, b, env.world, device, cfg.peak_tflops,
                                "MFU n/a (pass --peak-tflops)")
    env.say(f"bench: {budget.device_name(device)} | {stage.name} {' x '.join(map(str, shape))} | batch "
            f"{b}/process x {env.world} | {env.precision} | compile {env.compile} | channels_last "
            f"{env.channels_last} | activation checkpointing {run.model.grad_checkpoint} | warm-up "
            f"{warmup:.1f}s")
    env.say(f"bench: {line}")
    return 0

if __name__ == "__main__":
    main(started=STARTED)
