"""
The first stage of latent diffusion [LDM]: a convolutional autoencoder whose latent is pulled toward N(0, I)
by a small KL term, so that a DDPM can be trained on its small latents instead of the pixels.

    x (B, 3, H, W) in [-1, 1] -> Encoder -> mean, logvar of q(z | x), each (B, C, H/f, W/f)
        -> z = mean + exp(logvar / 2) * eps, eps ~ N(0, I)     (the reparameterisation trick, [VAE] sec. 2.4)
        -> Decoder -> x_hat (B, 3, H, W)

The encoder is conv_in, then per level num_res_blocks ResBlocks and a strided downsampling (log2 f of
them), a middle of ResBlock, self-attention, ResBlock, then GroupNorm, SiLU and a conv to 2C channels (mean
and log-variance). The decoder mirrors it, one ResBlock more per level as in the U-Net's expansive path. The
blocks are the U-Net's (unet.py), without a time embedding. A 64x64 face at f = 4 is a (4, 16, 16) latent:
12,288 numbers in 1,024.

The loss per image is [LDM] eq. 25 without its perceptual and adversarial terms (the perceptual one needs a
network pretrained elsewhere; the adversarial one did not help at the budgets measured, REPORT sec. 3.11):

    L = sum |x - x_hat| + kl_weight * KL(q(z | x) || N(0, I)),   kl_weight = 1e-6 as in [LDM] appendix G

divided by the number of pixel values, so that it reads as an L1 distance per pixel value.

The diffusion model then learns the latents scaled by `scale_factor` (1 / their standard deviation, [LDM]
sec. 4.3.2), and its samples are decoded: x = Decoder(z / scale_factor). The latent model carries its first
stage as [LDM]'s does (`FirstStage`: the frozen autoencoder and the scale factor; `Pixels`, the identity, for
a pixel model), so that nothing that draws or encodes asks which kind of model it holds. `Reconstruction` is
the autoencoder's training objective, with the same methods as diffusion.Denoising.

References:
  [LDM] Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752
  [VAE] Kingma, Welling 2014, "Auto-Encoding Variational Bayes", arXiv:1312.6114
"""
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from unet import Attention, Downsample, ResBlock, Upsample, norm

FACTORS = (2, 4, 8)  # the downsampling factors f
# channels per level, cut to log2(f) + 1 levels: [LDM]'s f = 4 is (1, 2, 4), its f = 8 (1, 2, 4, 4)
CH_MULT = (1, 2, 4, 4)
KL_WEIGHT = 1e-6  # [LDM] appendix G, kl-f4 and kl-f8


@dataclass
class AutoencoderConfig:
    image_size: int = 64
    factor: int = 4  # f: an image (3, H, W) <-> a latent (z_channels, H/f, W/f)
    z_channels: int = 4
    ch: int = 128  # base channel count ([LDM]'s first stages)
    num_res_blocks: int = 2  # ResBlocks per level in the encoder (the decoder has one more)
    mid_attn: bool = True  # self-attention in the middle of the encoder and of the decoder
    head_dim: int = 64

    @property
    def ch_mult(self):
        return CH_MULT[: round(math.log2(self.factor)) + 1]

    @property
    def latent_size(self):
        return self.image_size // self.factor


def check_config(cfg):
    """Raise ValueError(field, message) if the autoencoder cannot be built: the field at fault, the fix."""
    if cfg.factor not in FACTORS:
        raise ValueError("factor", f"{cfg.factor} is not one of {', '.join(map(str, FACTORS))}")
    if cfg.image_size < cfg.factor or cfg.image_size % cfg.factor:
        raise ValueError("image_size", f"{cfg.image_size} is not divisible by the factor {cfg.factor}; use a "
                         f"multiple of {cfg.factor}")
    for field in ("ch", "num_res_blocks", "z_channels"):
        if getattr(cfg, field) < 1:
            raise ValueError(field, "must be at least 1")


def config_dict(cfg):
    return asdict(cfg)


def config_from_dict(d):
    return AutoencoderConfig(**d)

# -----------------------------------------------------------------------------


def middle(c, cfg):
    """ResBlock, self-attention (if cfg.mid_attn), ResBlock, at the latent's resolution."""
    attn = [Attention(c, cfg.head_dim)] if cfg.mid_attn else []
    return nn.ModuleList([ResBlock(c, c, None, 0.0), *attn, ResBlock(c, c, None, 0.0)])


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch = cfg.ch
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(c, ch * mult, None, 0.0))
                c = ch * mult
            if level != len(cfg.ch_mult) - 1:
                self.down.append(Downsample(c))  # (H, W) -> (H/2, W/2)
        self.mid = middle(c, cfg)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = middle(c, cfg)
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(c, cfg.ch * mult, None, 0.0))
                c = cfg.ch * mult
            if level != 0:
                self.up.append(Upsample(c))  # (H, W) -> (2H, 2W)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.grad_checkpoint = False  # recompute each block in backward: far less memory, ~1/3 more compute

    def encode(self, x):
        """x (B, 3, H, W) -> q(z | x), a Posterior whose mean and log-variance are each (B, C, H/f, W/f)."""
        e = self.encoder
        h = e.conv_in(x)
        for block in [*e.down, *e.mid]:
            h = self._block(block, h)
        mean, logvar = e.conv_out(F.silu(e.norm_out(h))).chunk(2, dim=1)
        return Posterior(mean, logvar)

    def decode(self, z):
        """z (B, C, H/f, W/f) -> x_hat (B, 3, H, W)."""
        d = self.decoder
        h = d.conv_in(z)
        for block in [*d.mid, *d.up]:
            h = self._block(block, h)
        return d.conv_out(F.silu(d.norm_out(h)))

    def forward(self, x, noise):
        """x (B, 3, H, W), noise (B, C, H/f, W/f) ~ N(0, I) -> (x_hat, q(z | x)), x_hat decoded from the
        posterior's sample with that noise."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(noise)), posterior

    def _block(self, block, h):
        if self.grad_checkpoint and self.training:  # keep the block's input; recompute the rest in backward
            return checkpoint(block, h, use_reentrant=False)
        return block(h)

    def blocks(self):
        """The blocks a forward pass runs in turn (what a hook that watches the pass hangs on)."""
        return [*self.encoder.down, *self.encoder.mid, *self.decoder.mid, *self.decoder.up]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

class Posterior:
    """q(z | x) = N(mean, diag(exp(logvar))), [LDM]'s DiagonalGaussianDistribution."""

    def __init__(self, mean, logvar):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)  # as [LDM]'s: exp() stays finite

    def sample(self, noise):
        """z = mean + std * noise, noise ~ N(0, I) ([VAE] eq. 10: the reparameterisation trick,
        differentiable). """
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q(z | x) || N(0, I)) per image, in float32."""
        return kl_divergence(self.mean.float(), self.logvar.float())

# -----------------------------------------------------------------------------
# the loss


def kl_divergence(mean, logvar):
    """KL(N(mean, e^logvar) || N(0, I)) per image, summed over the latent ([VAE] appendix B):
    0.5 * sum(mean^2 + e^logvar - 1 - logvar)."""
    return 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def training_losses(model, x, noise, kl_weight=KL_WEIGHT):
    """Per-image loss (B,): (sum |x - x_hat| + kl_weight * KL) / (3 H W). noise: the posterior sample's."""
    x_hat, posterior = model(x, noise)
    rec = (x - x_hat.float()).abs().sum(dim=(1, 2, 3))
    return (rec + kl_weight * posterior.kl()) / x[0].numel()


@torch.no_grad()
def reconstruct(model, x):
    """x (B, 3, H, W) -> the decoded posterior mean, in [-1, 1]."""
    return model.decode(model.encode(x).mode()).clamp(-1, 1)


def psnr(x, y):
    """Peak signal-to-noise ratio per image (B,), in dB, of images in [-1, 1] (a peak-to-peak range of 2)."""
    mse = ((x.float() - y.float()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def scale_factor(latents):
    """[LDM] sec. 4.3.2: 1 / the standard deviation of the latents, which the diffusion model then sees at
    unit variance (its noise schedule assumes data of about that scale). latents: any shape; float64 sums."""
    return 1.0 / latents.double().std().item()


def scale_factor_of(n, total, squares):
    """scale_factor from the streaming count, sum and sum of squares (float64) of the latents: the same number
    as from the latents at once (with the unbiased variance)."""
    variance = (squares - total * total / n) / (n - 1)
    return 1.0 / math.sqrt(variance)


# -----------------------------------------------------------------------------
# training: the objective that a training loop optimises, one step at a time


class Reconstruction:
    """The autoencoder's training objective: each image through a sample of its posterior q(z | x), the loss
    above. The same methods as diffusion.Denoising, so that the loop that calls it does not ask which it
    holds."""
    face_steps = None  # reconstructions are faces from the start
    val_passes = 2  # its loss, and its reconstruction's PSNR
    grid_evals = 1

    def __init__(self, cfg, *, batch_size, shard, kl_weight=KL_WEIGHT):
        self.latent_shape = (cfg.z_channels, cfg.latent_size, cfg.latent_size)
        self.shape = (3, cfg.image_size, cfg.image_size)
        self.batch_size = batch_size  # the global batch, of which this rank's `shard` is trained here
        self.shard = shard
        self.kl_weight = kl_weight

    @staticmethod
    def probe_losses(model, x):
        """The per-image loss with zero noise: what a memory plan, a timing or a FLOP count runs."""
        net = model.cfg
        noise = torch.zeros(len(x), net.z_channels, net.latent_size, net.latent_size, device=x.device)
        return training_losses(model, x, noise)

    def losses(self, x, attrs, gen):
        """One step's loss: the posterior's noise drawn from `gen` for the global batch, this rank's shard of
        x (B/world, 3, H, W) kept. -> a function of the model: its per-image loss."""
        noise = torch.randn((self.batch_size, *self.latent_shape), generator=gen, device=x.device)[self.shard]
        return lambda model: training_losses(model, x, noise, self.kl_weight)

    @torch.no_grad()
    def grid(self, ema, examples, n, batch, ctx, callback=None):
        """Rows of originals (the first n of examples()), each above the row of their reconstructions (the
        decoded posterior means). -> (images in [-1, 1], images per row, model evaluations made)."""
        x = examples()[:n]
        with ctx:
            r = reconstruct(ema, x)
        k = max(1, round(math.sqrt(len(x))))  # images per row
        rows = [part for i in range(0, len(x), k) for part in (x[i:i + k], r[i:i + k])]
        return torch.cat(rows), k, len(x)

    def val_losses(self, ema, x, attrs, g, ctx):
        """The loss of `ema` on validation images x (the posterior's noise from `g`). -> (losses, PSNRs)."""
        noise = torch.randn((len(x), *self.latent_shape), generator=g, device=x.device)
        with ctx:
            losses = training_losses(ema, x, noise, self.kl_weight)
            return losses, psnr(reconstruct(ema, x), x)

    def forward(self, ema, x):
        """One model evaluation as a grid makes it: a reconstruction."""
        return reconstruct(ema, x)

# -----------------------------------------------------------------------------
# the first stage of a latent diffusion model, and of a pixel one


class FirstStage:
    """[LDM]'s first_stage_model and scale_factor: a trained autoencoder, frozen, between the images and the
    latents a diffusion model learns and draws (the posterior means times the scale factor, at about unit
    variance). A latent model carries it in its checkpoint: its config, its weights and where it came from
    (`source`: its path and the CRC-32 of its weights). The network is built by to(device)."""
    clip = False  # latents have no [-1, 1] range to clip x0_hat to

    def __init__(self, cfg, weights, scale_factor, source, model=None):
        self.cfg = cfg
        self.weights = weights  # the state dict, as the checkpoint keeps it
        self.scale_factor = scale_factor  # None until the latents are encoded
        self.source = source
        self.factor = cfg.factor
        self.model = model

    def with_scale(self, scale_factor):
        """This autoencoder with the scale factor of the latents it encoded."""
        return FirstStage(self.cfg, self.weights, scale_factor, self.source, self.model)

    def to(self, device, restride=None):
        """The network built on `device`, with its weights, frozen (restride(model): a memory format, e.g.
        channels_last). -> self."""
        model = Autoencoder(self.cfg)
        model.load_state_dict(self.weights)
        self.model = model.to(device).eval().requires_grad_(False)
        if restride is not None:
            restride(self.model)
        return self

    def latent_shape(self, size):
        """(C, h, w) of the latent of a size x size image."""
        return (self.cfg.z_channels, size // self.factor, size // self.factor)

    def encode(self, x):
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f): the posterior mean, scaled; in float32 under any
        autocast, as the latents it learned were encoded."""
        with torch.autocast(x.device.type, enabled=False):
            return self.model.encode(x.float()).mode() * self.scale_factor

    def decode(self, z):
        """Latents as the diffusion model learns and draws them (times the scale factor) -> images in [-1, 1];
        in float32 under any autocast (an fp16 decoder can overflow: diffusers' force_upcast)."""
        with torch.autocast(z.device.type, enabled=False):
            return self.model.decode(z.float() / self.scale_factor).clamp(-1, 1)

    def mask(self, mask):
        """A pixel mask (1, 1, H, W), 1 where kept, -> the latent grid's: a latent is kept where its whole f x
        f patch is (a min-pool); the rest, the seam's patches included, is filled in."""
        return -F.max_pool2d(-mask, self.factor)

    def checkpoint_entries(self):
        """What a latent model's checkpoint keeps of it."""
        args = dict(model_args=config_dict(self.cfg), scale_factor=self.scale_factor, **self.source)
        return dict(autoencoder=self.weights, autoencoder_args=args)

    @staticmethod
    def from_checkpoint(ckpt):
        """The first stage a latent model's checkpoint carries (call .to(device) to build it)."""
        a = ckpt["autoencoder_args"]
        source = {k: v for k, v in a.items() if k not in ("model_args", "scale_factor")}
        return FirstStage(config_from_dict(a["model_args"]), ckpt["autoencoder"], a["scale_factor"], source)


class Pixels:
    """A pixel model's first stage, [LDM]'s IdentityFirstStage: its images are what it learns and draws."""
    clip = True  # x0_hat is clipped to the images' [-1, 1]
    factor = 1

    def to(self, device, restride=None):
        return self

    def latent_shape(self, size):
        return (3, size, size)

    def encode(self, x):
        return x

    def decode(self, x):
        return x

    def mask(self, mask):
        return mask

    def checkpoint_entries(self):
        return {}


def check_weights(ckpt, part):
    """That `part` of a checkpoint, an autoencoder's weights, fits the model its config describes: built on
    the meta device, at no cost (KeyError, RuntimeError, TypeError or ValueError where it does not).
    util.load_checkpoint's check of the autoencoders."""
    from_checkpoint(ckpt, part, device="meta")


def from_checkpoint(ckpt, part="ema", device="cpu"):
    """The autoencoder that `part` of a train.py checkpoint holds, with those weights: an autoencoder run's
    ("model" or "ema"), or a latent run's first stage ("autoencoder"). On the meta device nothing is
    allocated or copied: a check that the config and the weights fit together."""
    if part == "autoencoder":
        net = config_from_dict(ckpt["autoencoder_args"]["model_args"])
    else:
        net = config_from_dict(ckpt["model_args"])
    with torch.device(device):
        model = Autoencoder(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on the meta device the copy is a no-op: keys and shapes are checked
        model.load_state_dict(ckpt[part])
    return model
