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
sec. 4.3.2), and its samples are decoded: x = Decoder(z / scale_factor).

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

import unet
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
        self.down, c = nn.ModuleList(), ch
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
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.grad_checkpoint = False  # recompute each block in backward: far less memory, ~1/3 more compute

    def encode(self, x):
        """x (B, 3, H, W) -> the mean and log-variance of q(z | x), each (B, C, H/f, W/f)."""
        e = self.encoder
        h = e.conv_in(x)
        for block in [*e.down, *e.mid]:
            h = self._block(block, h)
        mean, logvar = e.conv_out(F.silu(e.norm_out(h))).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as [LDM]'s DiagonalGaussianDistribution: exp() stays finite

    def decode(self, z):
        """z (B, C, H/f, W/f) -> x_hat (B, 3, H, W)."""
        d = self.decoder
        h = d.conv_in(z)
        for block in [*d.mid, *d.up]:
            h = self._block(block, h)
        return d.conv_out(F.silu(d.norm_out(h)))

    def forward(self, x, noise):
        """x (B, 3, H, W), noise (B, C, H/f, W/f) ~ N(0, I) -> (x_hat, mean, logvar), with z = mean + std *
        noise."""
        mean, logvar = self.encode(x)
        z = mean + torch.exp(0.5 * logvar) * noise  # [VAE] eq. 10: a sample of q(z | x), differentiable
        return self.decode(z), mean, logvar

    def _block(self, block, h):
        if self.grad_checkpoint and self.training:  # keep the block's input; recompute the rest in backward
            return checkpoint(block, h, use_reentrant=False)
        return block(h)

    def blocks(self):
        """The blocks a forward pass runs in turn (what a hook that watches the pass hangs on)."""
        return [*self.encoder.down, *self.encoder.mid, *self.decoder.mid, *self.decoder.up]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

# -----------------------------------------------------------------------------
# the loss


def kl_divergence(mean, logvar):
    """KL(N(mean, e^logvar) || N(0, I)) per image, summed over the latent ([VAE] appendix B):
    0.5 * sum(mean^2 + e^logvar - 1 - logvar)."""
    return 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


def training_losses(model, x, noise, kl_weight=KL_WEIGHT):
    """Per-image loss (B,): (sum |x - x_hat| + kl_weight * KL) / (3 H W). noise: the posterior sample's."""
    x_hat, mean, logvar = model(x, noise)
    rec = (x - x_hat.float()).abs().sum(dim=(1, 2, 3))
    kl = kl_divergence(mean.float(), logvar.float())
    return (rec + kl_weight * kl) / x[0].numel()


@torch.no_grad()
def reconstruct(model, x):
    """x (B, 3, H, W) -> the decoded posterior mean, in [-1, 1]."""
    mean, _ = model.encode(x)
    return model.decode(mean).clamp(-1, 1)


def psnr(x, y):
    """Peak signal-to-noise ratio per image (B,), in dB, of images in [-1, 1] (a peak-to-peak range of 2)."""
    mse = ((x.float() - y.float()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def scale_factor(latents):
    """[LDM] sec. 4.3.2: 1 / the standard deviation of the latents, which the diffusion model then sees at
    unit variance (its noise schedule assumes data of about that scale). latents: any shape; float64 sums."""
    return 1.0 / latents.double().std().item()


def decode_scaled(model, z, scale):
    """Latents as the diffusion model learns and draws them (times the scale factor) -> images in [-1, 1]."""
    return model.decode(z.float() / scale).clamp(-1, 1)


def check_weights(ckpt, part):
    """That `part` of a checkpoint fits the model its config describes: built on the meta device, at no cost
    (KeyError, RuntimeError, TypeError or ValueError where it does not). util.load_checkpoint's `build`."""
    from_checkpoint(ckpt, part, device="meta")


def from_checkpoint(ckpt, part="ema", device="cpu"):
    """The network that `part` of a train.py checkpoint holds, with those weights: an autoencoder run's
    autoencoder, a latent run's first stage (part "autoencoder"), or else the U-Net. On the meta device
    nothing is allocated or copied: a check that the config and the weights fit together."""
    if part == "autoencoder":
        net = config_from_dict(ckpt["autoencoder_args"]["model_args"])
    elif ckpt["args"].get("autoencoder"):
        net = config_from_dict(ckpt["model_args"])
    else:
        return unet.from_checkpoint(ckpt, part, device)
    with torch.device(device):
        model = Autoencoder(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on the meta device the copy is a no-op: keys and shapes are checked
        model.load_state_dict(ckpt[part])
    return model
