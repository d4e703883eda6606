"""
ControlNet ([CN] Zhang et al. 2023; lllyasviel/ControlNet cldm/cldm.py): a trained DDPM, locked, steered by
a spatial hint: here an edge map of a face, drawn as white lines on black.

    hint (B, 1, S, S) -> hint encoder: convs, stride 2 down to the U-Net's input grid, a zero conv
    x_t -> conv_in (a trainable copy) + the encoded hint -> the copy of the base's encoder and middle
        -> one zero-initialised 1x1 conv per skip, one for the middle -> residuals, times the control scale
    the locked base: x_t -> its encoder and middle; + the middle's residual; each skip + its residual
        -> its decoder -> eps

The copy starts as the base's own weights, and every zero conv outputs 0 at step 0: the controlled model
starts as the base exactly, and training moves only the control's weights ([CN] sec. 3.1). The copy reads
the base's time embedding and (a text model's) caption, so the condition reaches both; guidance keeps the
hint in both of its branches. The hint of a training image is its own edges (`edges`): of the image, or for
a latent model of its latent decoded (which the hint encoder then brings down to the latent grid).

  [CN] Zhang, Rao, Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models",
       arXiv:2302.05543
"""
import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import unet
from diffusion import Denoising

EDGE_SHARE = 0.10  # an edge map keeps this share of each image's pixels: its strongest gradients
HINT_WIDTH = 16  # the hint encoder's first channels, doubled at each halving ([CN]'s 16, 32, 96, 256)

# -----------------------------------------------------------------------------
# edges: the hint of a face, and how well a sample keeps it


def sobel(x):
    """The gradient magnitude of images x (B, 3, H, W) in [-1, 1], grey and blurred first (the first steps
    of Canny's detector). -> (B, 1, H, W)."""
    grey = (x.float() * torch.tensor([0.299, 0.587, 0.114], device=x.device)[:, None, None]).sum(1, True)
    blur = torch.tensor([1.0, 2.0, 1.0], device=x.device)
    blur = (blur[:, None] * blur[None]) / 16  # a 3x3 binomial (Gaussian) blur
    grey = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), blur[None, None])
    gx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device)
    kernels = torch.stack([gx, gx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)  # (B, 2, H, W)
    return g.square().sum(1, keepdim=True).sqrt()


def edges(x, share=EDGE_SHARE):
    """The edge map of images x (B, 3, H, W) in [-1, 1]: 1 at the `share` of each image's pixels with the
    strongest gradient, else 0. -> (B, 1, H, W) float."""
    g = sobel(x).flatten(1)  # (B, HW)
    k = max(1, round(share * g.shape[1]))
    threshold = g.topk(k, dim=1).values[:, -1:]  # (B, 1): the k-th strongest
    return ((g >= threshold) & (g > 0)).float().view(len(x), 1, *x.shape[2:])  # (a flat image has none)


def hint_of_drawing(grey):
    """A drawing (1, 1, S, S) in [0, 1], white lines on black, as the edge maps the model learned from: 1
    where it is at least half as bright as its brightest, else 0, its lines thickened (a 3x3 max filter, at
    most three times) while they cover less than half of EDGE_SHARE of the pixels (a thin pen, or a large
    drawing scaled down). -> (1, 1, S, S) in {0, 1}."""
    hint = (grey >= 0.5 * grey.amax(dim=(1, 2, 3), keepdim=True)).float()
    for _ in range(3):
        if hint.mean() >= EDGE_SHARE / 2:
            break
        hint = F.max_pool2d(hint, 3, stride=1, padding=1)
    return hint


def dice(a, b):
    """The Dice overlap 2|a & b| / (|a| + |b|) of binary maps a and b (B, 1, H, W) -> (B,)."""
    a, b = a.flatten(1) > 0.5, b.flatten(1) > 0.5
    return 2 * (a & b).sum(1) / (a.sum(1) + b.sum(1)).clamp(min=1)


def edge_dice(images, hints):
    """How well images (B, 3, H, W) in [-1, 1] keep their hints (B, 1, H, W): the Dice of their own edge map
    (the same share of pixels) against the hint's top `EDGE_SHARE`. -> (B,)."""
    if hints.shape[-1] != images.shape[-1]:
        hints = F.interpolate(hints, size=images.shape[-2:], mode="bilinear", antialias=True)
    return dice(edges(images), edges_of_hint(hints))


def edges_of_hint(hints, share=EDGE_SHARE):
    """A hint's strongest `share` (a drawn sketch is grey-levelled by its resizing) as a binary map."""
    g = hints.flatten(1)
    k = max(1, round(share * g.shape[1]))
    return (g >= g.topk(k, dim=1).values[:, -1:]).float().view_as(hints) * (hints > 0).float()

# -----------------------------------------------------------------------------
# the network


@dataclass
class ControlConfig:
    """A controlled model: its base U-Net's config (a checkpoint's model_args), the hint's size in pixels, and
    the base's weights' CRC-32 (which file the control was trained on). Its base's fields read through: a
    controlled model has the attributes, words and latent shape of its base."""
    base: dict
    hint_size: int
    base_id: str = ""

    def __repr__(self):
        return f"ControlConfig(hint_size={self.hint_size}, base_id={self.base_id!r}, base={self.unet!r})"

    @property
    def unet(self):
        """The base's UNetConfig."""
        return unet.config_from_dict(self.base)

    def __getattr__(self, name):  # the base's fields: image_size, in_channels, attrs, vocab, ...
        if name in ("base", "unet") or name.startswith("__"):  # (no base yet: a copy being made)
            raise AttributeError(name)
        base = self.unet
        if not hasattr(base, name):
            raise AttributeError(name)
        return getattr(base, name)


def config_from_dict(model_args):
    return ControlConfig(**model_args)


def zero_conv(c_in, c_out, k=1):
    """[CN]'s zero convolution: a conv whose weight and bias start at 0."""
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def out_channels(block):
    """The channels a U-Net encoder block puts out (a ResAttnBlock's or a Downsample's)."""
    if isinstance(block, unet.ResAttnBlock):
        return block.res.conv2.out_channels
    return block.conv.out_channels


class HintEncoder(nn.Module):
    """The hint (B, 1, S, S) -> (B, ch, S/2^k, S/2^k), the U-Net's input grid: convs with SiLU, a stride-2
    conv per halving (none for a pixel model), and a zero conv out ([CN]'s input_hint_block)."""

    def __init__(self, hint_size, grid, ch):
        super().__init__()
        halvings = int(math.log2(hint_size // grid))
        c = HINT_WIDTH
        layers = [nn.Conv2d(1, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1), nn.SiLU()]
        for _ in range(halvings):
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU()]
            c *= 2
        layers.append(zero_conv(c, ch, 3))
        self.net = nn.Sequential(*layers)

    def forward(self, hint):
        return self.net(hint)


class ControlNet(nn.Module):
    """The trainable part: the hint encoder, a copy of the base's conv_in, encoder and middle, and a zero conv
    per skip and for the middle."""

    def __init__(self, base, hint_size):
        super().__init__()
        self.hint_encoder = HintEncoder(hint_size, base.cfg.image_size, base.cfg.ch)
        self.conv_in = copy.deepcopy(base.conv_in)
        self.down = copy.deepcopy(base.down)
        self.mid = copy.deepcopy(base.mid)
        widths = [base.cfg.ch] + [out_channels(b) for b in base.down]  # the skips', in the base's order
        self.zero_convs = nn.ModuleList(zero_conv(c, c) for c in widths)
        self.mid_out = zero_conv(widths[-1], widths[-1])
        self.requires_grad_(True)  # (a copy of a locked base is locked too)
        self.grad_checkpoint = False

    def forward(self, x, temb, context, hint, scale=1.0):
        """The residuals for the base's skips and middle: [(B, C_i, H_i, W_i) per skip, the middle's]."""
        h = self.conv_in(x) + self.hint_encoder(hint.to(x.dtype))  # (B, ch, H, W)
        h, hs = unet.UNet.encoder(self, h, temb, context)  # the base's encoder pass, on the copy's blocks
        out = [z(s) for z, s in zip(self.zero_convs, hs)] + [self.mid_out(h)]
        return [r * scale for r in out] if scale != 1 else out

    _block = unet.UNet._block


class ControlledUNet(nn.Module):
    """The locked base U-Net and its ControlNet, called as a U-Net with a hint: model(x_t, t, attrs, text,
    hint) (B, 1, S, S) in [0, 1], or one hint (1, 1, S, S) for the whole batch; no hint is the all-black one.
    `scale` weights the control (0: the base alone)."""

    def __init__(self, cfg: ControlConfig):
        super().__init__()
        self.cfg = cfg
        self.base = unet.UNet(unet.config_from_dict(cfg.base)).requires_grad_(False)
        self.control = ControlNet(self.base, cfg.hint_size)
        self.scale = 1.0

    def forward(self, x, t, attrs=None, text=None, hint=None):
        if hint is None:
            hint = torch.zeros(1, 1, self.cfg.hint_size, self.cfg.hint_size, device=x.device)
        control = functools.partial(self.control, hint=unet.hints_for(hint, len(x)), scale=self.scale)
        return self.base(x, t, attrs, text, control=control)

    def train(self, mode=True):
        """The base stays in eval mode: locked, its dropout off too."""
        super().train(mode)
        self.base.eval()
        return self

    @property
    def grad_checkpoint(self):
        return self.control.grad_checkpoint

    @grad_checkpoint.setter
    def grad_checkpoint(self, on):  # (budget.plan_memory's choice, for both)
        self.base.grad_checkpoint = on
        self.control.grad_checkpoint = on

    def load_base(self, weights):
        """The base's weights, and the copy initialised from them."""
        self.base.load_state_dict(weights)
        for name in ("conv_in", "down", "mid"):
            getattr(self.control, name).load_state_dict(getattr(self.base, name).state_dict())

    def blocks(self):
        return [*self.control.down, *self.control.mid, *self.base.blocks()]

    def attention_layers(self):
        return self.base.attention_layers()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def trainable_params(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def check_weights(ckpt, part):
    """That `part` of a checkpoint fits the controlled model its config describes (on the meta device)."""
    from_checkpoint(ckpt, part, device="meta")


def from_checkpoint(ckpt, weights="ema", device="cpu"):
    """The controlled model of a train.py --control checkpoint, with its `weights` (base and control)."""
    return unet.built(ControlledUNet, config_from_dict(ckpt["model_args"]), ckpt[weights], device)

# -----------------------------------------------------------------------------
# the objective: a DDPM's, with each image's edges as its hint


class Controlled(Denoising):
    """[DDPM] Algorithm 1 for a model that takes a hint (the controlled model, or the baseline that reads it
    as input channels, unet.UNet's hint_channels): each image's own edge map is its hint (a latent's: of
    its decoding); a condition is dropped for guidance as a DDPM's is, the hint never."""

    @torch.no_grad()
    def hints(self, x0):
        """The hints of training images (or latents) x0: their edges (B, 1, S, S)."""
        return edges(self.first.decode(x0))

    def losses(self, x0, cond, gen):
        loss = super().losses(x0, cond, gen)
        hint = self.hints(x0)
        return lambda model: loss(functools.partial(model, hint=hint))

    def val_losses(self, ema, x0, cond, g, ctx):
        return super().val_losses(functools.partial(ema, hint=self.hints(x0)), x0, cond, g, ctx)

    @torch.no_grad()
    def grid(self, ema, examples, n, batch, ctx, callback=None):
        """Pairs: the hint of an example (a validation image), white lines on black, and a sample drawn to it,
        from the same noise at every call. -> (images in [-1, 1], images per row, model evaluations made)."""
        hints = self.hints(examples()[:n])
        faces, _, evals = super().grid(ema, examples, len(hints), batch, ctx, callback, dict(hint=hints))
        pairs = torch.stack([hints.expand(-1, 3, -1, -1) * 2 - 1, faces.float()], dim=1).flatten(0, 1)
        side = 2 * max(1, round(math.sqrt(len(hints) / 2)))  # an even number of columns: pairs side by side
        return pairs, side, evals
