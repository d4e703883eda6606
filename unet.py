"""
The time-conditioned U-Net of DDPM (Ho et al. 2020, appendix B), the network that predicts the noise.

    x_t (B, 3, H, W), t (B,) -> conv_in -> [ResBlock (+ self-attention) x N, downsample] per level
                             -> middle: ResBlock, self-attention, ResBlock
                             -> [ResBlock on concat(h, skip) (+ attention) x (N+1), upsample] per level
                             -> GroupNorm, SiLU, conv_out (zero-initialised) -> (B, 3, H, W)

The timestep enters as a sinusoidal embedding, then an MLP, and is added inside every ResBlock.
A conditional model (cfg.attrs names K binary attributes, e.g. CelebA's Smiling, Male) adds one learned
vector per attribute and state to that embedding: attrs (B, K) holds +1 (present), -1 (absent) or 0
(unspecified, which adds nothing). So the unconditional model is the conditional one with every attribute
unspecified, the state classifier-free guidance (Ho & Salimans 2022) contrasts the condition with. With
cfg.attr_film the attribute embedding also scales and shifts each ResBlock's normalised features (FiLM).

A text model (cfg.vocab: the tokenizer's words) holds its text encoder (text.py) and, at the attention
resolutions and in the middle, a TransformerBlock in place of the self-attention: self-attention, then
cross-attention from every position to the caption's tokens, then a feed-forward ([LDM]'s
SpatialTransformer). The empty caption is its unconditional model.

A ControlNet (control.py) steers a trained U-Net through forward's `control`: residuals added to each skip
connection and to the middle's output, made by a trainable copy of this encoder (UNet.encoder) from the
same time embedding and caption.

  [LDM] Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv:2112.10752
"""
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import text as texts

# -----------------------------------------------------------------------------
# configuration: one preset per image size, every field overridable


@dataclass
class UNetConfig:
    image_size: int = 64
    in_channels: int = 3
    ch: int = 128  # base channel count
    ch_mult: tuple = (1, 2, 2, 2, 4)  # channels per level = ch * mult; len(ch_mult) - 1 downsamplings
    num_res_blocks: int = 2  # ResBlocks per level in the encoder (the decoder has one more)
    attn_res: tuple = (16,)  # feature-map sizes that get self-attention
    dropout: float = 0.1
    head_dim: int = 64  # attention heads = channels // head_dim (at least 1)
    attrs: tuple = ()  # names of the binary attributes it is conditioned on; () is an unconditional model
    attr_film: bool = False  # the attributes also scale and shift every ResBlock's normalised features (FiLM)
    vocab: tuple = ()  # a text model's words (text.Tokenizer's); () is no text model
    text_dim: int = 256  # the text encoder's width
    text_layers: int = 3  # its transformer blocks
    max_tokens: int = texts.MAX_TOKENS  # of a caption, [BOS] and [EOS] included
    hint_channels: int = 0  # a ControlNet's baseline: an edge map's channels, concatenated to the input


    def __repr__(self):  # the text fields only for a text model, its words counted
        shown = [f"{k}={v!r}" for k, v in asdict(self).items()
                 if (self.vocab or k not in TEXT_FIELDS) and (self.hint_channels or k != "hint_channels")]
        shown = [f"vocab={len(self.vocab)} tokens" if s.startswith("vocab=") else s for s in shown]
        return f"UNetConfig({', '.join(shown)})"


TEXT_FIELDS = ("vocab", "text_dim", "text_layers", "max_tokens")


PRESETS = {
    # for the latents of latent diffusion (a 64x64 face at f = 8 and f = 4): the 32 preset's width, one
    # level fewer per halving of the size, attention at 8x8 (and in the middle)
    8: dict(ch=128, ch_mult=(1, 2), attn_res=(8,), dropout=0.1),
    16: dict(ch=128, ch_mult=(1, 2, 2), attn_res=(8,), dropout=0.1),
    # DDPM's CIFAR-10 network (35.7M params)
    32: dict(ch=128, ch_mult=(1, 2, 2, 2), attn_res=(16,), dropout=0.1),
    # the DDIM paper's CelebA 64x64 network: 128 channels, mult 1,2,2,2,4, attention at 16x16, dropout 0.1
    64: dict(ch=128, ch_mult=(1, 2, 2, 2, 4), attn_res=(16,), dropout=0.1),
    128: dict(ch=128, ch_mult=(1, 1, 2, 3, 4), attn_res=(16,), dropout=0.1),
    # DDPM's CelebA-HQ / LSUN 256x256 network
    256: dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), attn_res=(16,), dropout=0.0),
}


def preset(image_size, **overrides):
    """The preset for `image_size` (the nearest preset at or below it for other sizes), with overrides."""
    base = PRESETS[max([s for s in PRESETS if s <= image_size] or [min(PRESETS)])]
    kw = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    kw["ch_mult"], kw["attn_res"] = tuple(kw["ch_mult"]), tuple(kw["attn_res"])
    return UNetConfig(image_size=image_size, **kw)


def check_config(cfg):
    """Raise ValueError(field, message) if the network cannot be built: the UNetConfig field at fault, and the
    fix."""
    factor = 2 ** (len(cfg.ch_mult) - 1)
    if cfg.image_size < 1 or cfg.image_size % factor:
        downs = len(cfg.ch_mult) - 1
        mults = ",".join(map(str, cfg.ch_mult))
        levels = f"{downs} downsampling{'s' if downs != 1 else ''} for ch_mult {mults}"
        raise ValueError("image_size", f"{cfg.image_size} is not divisible by {factor} ({levels}); "
                         f"use a multiple of {factor}")
    for field, bad in (("ch", cfg.ch < 1), ("num_res_blocks", cfg.num_res_blocks < 1),
                       ("ch_mult", not cfg.ch_mult or min(cfg.ch_mult) < 1)):
        if bad:
            raise ValueError(field, f"must be at least 1{' in every entry' if field == 'ch_mult' else ''}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError("dropout", f"{cfg.dropout:g} must be in [0, 1), e.g. 0.1")
    sizes = [cfg.image_size >> level for level in range(len(cfg.ch_mult))]  # feature-map size at each level
    if any(r not in sizes for r in cfg.attn_res):
        asked, wide = ",".join(map(str, cfg.attn_res)), ",".join(map(str, sizes))
        raise ValueError("attn_res", f"{asked}: the feature maps of a {cfg.image_size}px model are "
                         f"{wide} wide; pick attention sizes among those")


# -----------------------------------------------------------------------------
# building blocks


def norm(c):
    # GroupNorm with 32 groups (as in DDPM), fewer for narrow layers: every group keeps at least 4
    # channels, because the time embedding enters as a per-channel bias before a GroupNorm, which would
    # subtract it away entirely in a group of one channel.
    return nn.GroupNorm(math.gcd(32, max(1, c // 4), c), c)  # the gcd with c: the groups must divide c


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in the Transformer (DDPM appendix B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))  # (B, dim)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, + the time embedding, GroupNorm, SiLU, dropout, conv, + the input. temb_dim
    None: no time embedding (the autoencoder's blocks)."""

    def __init__(self, c_in, c_out, temb_dim, dropout, film=False):
        super().__init__()
        self.norm1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        if temb_dim is not None:
            self.temb = nn.Linear(temb_dim, c_out)  # per-channel bias from the time embedding
        self.norm2 = norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each residual branch starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        if film:  # per-channel scale and shift from the attribute embedding, starting at (1, 0)
            self.film = nn.Linear(temb_dim, 2 * c_out)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x, emb=None):  # x (B, c_in, H, W); emb: the time embedding (B, temb_dim) after SiLU
        temb, aemb = emb if isinstance(emb, tuple) else (emb, None)  # FiLM: also the attributes
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        if temb is not None:
            h = h + self.temb(temb)[:, :, None, None]  # time injected into every block
        h = self.norm2(h)
        if aemb is not None:
            scale, shift = self.film(aemb)[:, :, None, None].chunk(2, dim=1)  # each (B, c_out, 1, 1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, c, head_dim):
        super().__init__()
        self.heads = max(1, c // head_dim)
        self.norm = norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)  # the queries, keys and values of every position
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def queries_keys_values(self, x):  # x (B, C, H, W) -> q, k, v, each (B, nh, HW, hs)
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C): one token per position
        # The 1x1 convs applied as matmuls over the channels of each token: the output (B, HW, 3C) is
        # contiguous whatever x's memory format, so q, k and v have unit stride in their last dimension, which
        # SDPA's flash kernels need (a reshape of the conv's NCHW output would leave a stride of HW and fall
        # back to math).
        qkv = F.linear(h, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, HW, 3C)
        return qkv.view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x, context=None):  # x (B, C, H, W); context: a text model's (TransformerBlock's)
        B, C, H, W = x.shape
        q, k, v = self.queries_keys_values(x)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)  # (B, HW, C)
        h = F.linear(h, self.proj.weight.flatten(1), self.proj.bias)  # (B, HW, C)
        return x + h.transpose(1, 2).view(B, C, H, W)

    def weights(self, x):
        """Where each position looks: softmax(q k^T / sqrt(hs)), (B, nh, HW, HW). For figures; forward uses
        SDPA."""
        q, k, _ = self.queries_keys_values(x)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


class TransformerBlock(nn.Module):
    """[LDM]'s SpatialTransformer of depth 1: the feature map as tokens, through self-attention,
    cross-attention to the caption's tokens (its padding masked) and a feed-forward, each pre-norm with a
    residual; the output projection starts at zero, so the block starts as the identity."""

    def __init__(self, c, head_dim, context_dim):
        super().__init__()
        self.heads = max(1, c // head_dim)
        self.norm = norm(c)
        self.proj_in = nn.Linear(c, c)
        self.ln1 = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)  # self-attention
        self.out1 = nn.Linear(c, c)
        self.ln2 = nn.LayerNorm(c)
        self.q = nn.Linear(c, c)  # cross-attention: queries from the positions, keys and values from the text
        self.kv = nn.Linear(context_dim, 2 * c)
        self.out2 = nn.Linear(c, c)
        self.ln3 = nn.LayerNorm(c)
        self.ff = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
        self.proj_out = nn.Linear(c, c)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def heads_of(self, x):  # (B, N, C) -> (B, nh, N, hs)
        return x.unflatten(2, (self.heads, -1)).transpose(1, 2)

    def cross(self, h, context, mask):
        """-> the cross-attention's queries and keys, values (B, nh, HW or L, hs) and mask (B, 1, 1, L)."""
        k, v = self.kv(context).chunk(2, dim=-1)  # each (B, L, C)
        return self.heads_of(self.q(self.ln2(h))), self.heads_of(k), self.heads_of(v), mask[:, None, None, :]

    def forward(self, x, context):  # x (B, C, H, W); context: (the text (B, L, D), its mask (B, L))
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C): one token per position
        q, k, v = (self.heads_of(p) for p in self.qkv(self.ln1(h)).chunk(3, dim=-1))
        h = h + self.out1(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        q, k, v, mask = self.cross(h, *context)
        h = h + self.out2(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))
        h = h + self.ff(self.ln3(h))
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)

    def cross_weights(self, x, context):
        """Where each position looks in the caption: (B, nh, HW, L), for figures (forward uses SDPA). x: the
        block's input."""
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        q, k, v = (self.heads_of(p) for p in self.qkv(self.ln1(h)).chunk(3, dim=-1))
        h = h + self.out1(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        q, k, _, mask = self.cross(h, *context)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1)


class ResAttnBlock(nn.Module):
    """A ResBlock, followed by self-attention when the feature map is in attn_res (a text model's: a
    TransformerBlock, with cross-attention to the caption)."""

    def __init__(self, c_in, c_out, temb_dim, dropout, attn, head_dim, film=False, context_dim=0):
        super().__init__()
        self.res = ResBlock(c_in, c_out, temb_dim, dropout, film)
        self.attn = None
        if attn and context_dim:
            self.attn = TransformerBlock(c_out, head_dim, context_dim)
        elif attn:
            self.attn = Attention(c_out, head_dim)

    def forward(self, x, temb, context=None):
        x = self.res(x, temb)
        return self.attn(x, context) if self.attn is not None else x


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)  # strided conv: (H, W) -> (H/2, W/2)

    def forward(self, x, temb=None, context=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, temb=None, context=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (H, W) -> (2H, 2W)


# -----------------------------------------------------------------------------


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        ch = cfg.ch
        temb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        if cfg.attrs:  # column k: attribute k present, K + k: absent; no bias: "unspecified" adds exactly 0
            # Linear's default init gives each vector a norm like the time embedding's; zero-initialised ones
            # stayed ~20x smaller after 1,600 steps and the model barely followed them (REPORT sec. 3.7)
            self.attr_emb = nn.Linear(2 * len(cfg.attrs), temb_dim, bias=False)
        film = bool(cfg.attrs) and cfg.attr_film
        context = cfg.text_dim if cfg.vocab else 0  # a text model: cross-attention to its tokens
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.hint_channels, ch, 3, padding=1)

        # encoder: remember the channel count of every feature map that becomes a skip connection
        self.down = nn.ModuleList()
        skips = [ch]
        c = ch
        res = cfg.image_size  # the feature map's size at this level
        for level, mult in enumerate(cfg.ch_mult):
            for _ in range(cfg.num_res_blocks):
                attn = res in cfg.attn_res
                self.down.append(ResAttnBlock(c, ch * mult, temb_dim, cfg.dropout, attn, cfg.head_dim, film,
                                              context))
                c = ch * mult
                skips.append(c)
            if level != len(cfg.ch_mult) - 1:
                self.down.append(Downsample(c))
                skips.append(c)
                res //= 2

        self.mid = nn.ModuleList([ResAttnBlock(c, c, temb_dim, cfg.dropout, True, cfg.head_dim, film,
                                               context),
                                  ResAttnBlock(c, c, temb_dim, cfg.dropout, False, cfg.head_dim, film)])

        # decoder: each block takes concat(h, skip); one more block per level than the encoder
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.ch_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                attn = res in cfg.attn_res
                c_in = c + skips.pop()
                self.up.append(ResAttnBlock(c_in, ch * mult, temb_dim, cfg.dropout, attn, cfg.head_dim, film,
                                            context))
                c = ch * mult
            if level != 0:
                self.up.append(Upsample(c))
                res *= 2

        self.grad_checkpoint = False  # recompute each block in backward: far less memory, ~1/3 more compute
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # the network starts by predicting 0
        nn.init.zeros_(self.conv_out.bias)
        if cfg.vocab:  # last: the other weights start as an unconditional model's of the same seed
            widths = range(max(1, cfg.text_dim // 64), 0, -1)
            heads = next(h for h in widths if cfg.text_dim % h == 0)  # heads about 64 wide
            self.text_encoder = texts.TextEncoder(len(cfg.vocab), cfg.text_dim, cfg.text_layers, heads,
                                                  cfg.max_tokens)

    def forward(self, x, t, attrs=None, text=None, control=None, hint=None):
        # x (B, C, H, W), t (B,) indices 0..T-1, attrs (B, K) in {-1, 0, 1}, text (B, L) token ids; control: a
        # ControlNet's residuals for the skips and the middle, control(x, temb, context) (control.py); hint:
        # the edge map (B, 1, S, S) of a model with hint_channels, the ControlNet's baseline
        if self.cfg.hint_channels:
            x = self.with_hint(x, hint)
        temb = self.time_mlp(timestep_embedding(t, self.cfg.ch))  # (B, 4ch)
        context = None  # a text model's caption, which its cross-attention reads
        if self.cfg.attrs or self.cfg.vocab:
            temb, context = self.condition(temb, x, attrs, text)
        else:
            temb = F.silu(temb)
        h, hs = self.encoder(self.conv_in(x), temb, context)
        if control is not None:
            *skips, middle = control(x, temb, context)
            hs = [s + r for s, r in zip(hs, skips)]
            h = h + middle
        for block in self.up:
            if isinstance(block, ResAttnBlock):
                h = torch.cat([h, hs.pop()], dim=1)  # encoder features concatenated into the decoder
            h = self._block(block, h, temb, context)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, H, W)

    def with_hint(self, x, hint):
        """x_t (B, C, H, W) and its edge map (B, 1, S, S), none: the all-black one, cut into S/H x S/H patches
        (pixel-unshuffled) -> (B, C + (S/H)^2, H, W): the concatenation that conv_in reads."""
        f = math.isqrt(self.cfg.hint_channels)  # the hint's pixels per position, along each side
        if hint is None:
            hint = x.new_zeros(len(x), 1, x.shape[-2] * f, x.shape[-1] * f)
        return torch.cat([x, F.pixel_unshuffle(hints_for(hint, len(x)).to(x.dtype), f)], dim=1)

    def encoder(self, h, temb, context):
        """conv_in's features (B, ch, H, W) through the encoder and the middle. -> (the middle's output
        (B, ch*mult[-1], H/2^L, W/2^L), the skips the decoder takes: conv_in's and every encoder block's)."""
        hs = [h]
        for block in self.down:
            h = self._block(block, h, temb, context)
            hs.append(h)
        for block in self.mid:
            h = self._block(block, h, temb, context)
        return h, hs

    def condition(self, temb, x, attrs, text):
        """The condition's embedding: the attributes' vectors added to the time embedding (with FiLM, also
        passed beside it), or the caption through the text encoder (none given: the empty caption).
        -> (the blocks' temb, after SiLU; the text's (B, L, text_dim) vectors and (B, L) mask, or None)."""
        aemb = None
        context = None
        if self.cfg.attrs:
            attrs = attrs if attrs is not None else torch.zeros(len(x), len(self.cfg.attrs), device=x.device)
            onehot = torch.cat([attrs > 0, attrs < 0], dim=1).to(temb.dtype)  # (B, 2K)
            aemb = self.attr_emb(onehot)  # the sum of one vector per specified attribute (0 if none is)
            temb = temb + aemb
        if self.cfg.vocab:
            context = self.text_encoder(texts.empty(len(x), x.device) if text is None else text)
        temb = F.silu(temb)
        if aemb is not None and self.cfg.attr_film:
            temb = (temb, aemb)  # the blocks' FiLM reads the attributes on their own
        return temb, context

    def _block(self, block, h, temb, context):
        if self.grad_checkpoint and self.training:  # keep the block's input; recompute the rest in backward
            return checkpoint(block, h, temb, context, use_reentrant=False)
        return block(h, temb, context)

    def blocks(self):
        """The blocks a forward pass runs in turn (what a hook that watches the pass hangs on)."""
        return [*self.down, *self.mid, *self.up]

    def attention_layers(self):
        """The attention layers (a text model's: TransformerBlocks), in the order a forward pass runs them
        (figures show where they look)."""
        return [b.attn for b in self.blocks() if isinstance(b, ResAttnBlock) and b.attn is not None]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def hints_for(hint, n):
    """A batch of n hints from `hint` (B, 1, S, S): one for all (B = 1), or the same B repeated (guidance's
    doubled batch)."""
    if len(hint) != n:
        hint = hint.repeat(n // len(hint), 1, 1, 1)
    return hint


def config_dict(cfg):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def config_from_dict(model_args):
    """The UNetConfig of the plain dict stored in a checkpoint."""
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()})


def check_weights(ckpt, part):
    """That `part` of a checkpoint fits the U-Net its config describes: built on the meta device, at no cost
    (KeyError, RuntimeError, TypeError or ValueError where it does not). util.load_checkpoint's check."""
    from_checkpoint(ckpt, part, device="meta")


def from_checkpoint(ckpt, weights="ema", device="cpu"):
    """The U-Net a train.py checkpoint describes, with its `weights` ("ema" or "model")."""
    return built(UNet, config_from_dict(ckpt["model_args"]), ckpt[weights], device)


def built(build, cfg, state, device="cpu"):
    """build(cfg) on `device`, with the weights `state`. On the meta device nothing is allocated or copied: a
    check that the config and the weights fit together."""
    with torch.device(device):
        model = build(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on the meta device the copy is a no-op: keys and shapes are checked
        model.load_state_dict(state)
    return model
