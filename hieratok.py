"""
HieraTok: a multi-scale ViT image tokenizer and a DiT on its latents: the method, in one file.
Paper: "HieraTok: Multi-Scale Visual Tokenizer Improves Image Reconstruction and Generation"
(arXiv 2509.23736). runtime.py holds what runs it (flags, set-up, checkpoints, data).

  1. Primitives ........... patchify / unpatchify, sin-cos table, area pool, LayerNorm2d
  2. Transformer block .... Attention (SDPA, an optional boolean mask), the scale mask, MLP,
                            Block
  3. Configuration ........ HieraTokConfig and its per-scale loss weights
  4. Encoder .............. ViT: image -> the moments (mean, log-variance) of z (B, d, S, S)
  5. Downsampler .......... the full-resolution token map -> the coarser maps (conv | interp)
  6. Decoder .............. scale-masked ViT over the coarse-to-fine sequence, one head per scale
  7. Tokenizer ............ HieraTok: encode / tokens (z -> decoder width -> token maps) / decode
  8. Losses ............... every scale's reconstruction + KL in LDM's units, PatchGAN, adaptive
                            weights, VF alignment (VA-VAE), generator_loss
  9. DiT .................. Peebles & Xie's adaLN-Zero transformer on z
 10. Objectives .......... DDPM (schedule, loss with its variational term, ancestral sampler)
                            and flow matching (loss, Euler / Heun), CFG, per-sample noise
 11. Presets .............. TOKENIZER_PRESETS, DIT_PRESETS, AdamW groups
 12. FLOPs ................ forward FLOPs per image counted by torch (tokenizer, decoder prefix,
                            DiT)

Notable choices (the README's design notes give the reasoning):
- Images live in [-1, 1]. The latent the DiT learns is z before any downsampling, so single- and
  multi-scale tokenizers hand the DiT the same (B, d, S, S) tensor.
- Scale-causal attention is one boolean mask built once from per-token scale indices and handed to
  SDPA; it makes decoding progressive (Decoder).
- The loss is in LDM's units, so the paper's weights mean what they say (generator_loss).
- The DiT is vanilla DiT's DDPM by default (the paper's testbed: noise and learned variance,
  250 respaced ancestral steps), flow matching as an option; per-sample seeds make each sample's
  noise independent of batch size and GPU count.
"""

import functools
import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import StochasticDepth

IMAGENET_CLASSES = 1000
# LPIPS runs on the scales whose image its network can take: VGG's four 2x2 max-pools need 16 px,
# AlexNet's stride-4 11x11 conv and two 3x3 / 2 max-pools need 31 (so 32 at our sizes)
LPIPS_MIN_SIZE = {"vgg": 16, "alex": 32}

# ----------------------------------------------------------------------------------------------
# 1. Primitives


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), patches in row-major order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)                # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, h, C=3):
    """(B, h*h, p*p*C) -> (B, C, h*p, h*p); the inverse of patchify for a square grid of side h."""
    B = x.shape[0]
    x = x.reshape(B, h, h, p, p, C)                          # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, h * p)


def sincos_2d(dim, grid):
    """Fixed 2-D sin-cos position table (grid*grid, dim): the first half of the channels encode
    the column, the second half the row."""
    assert dim % 4 == 0, "sin-cos embedding needs a width divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(pos, pos, indexing="ij")
    out = [f(g.reshape(-1, 1) * omega) for g in (gx, gy) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1).float()                    # (grid*grid, dim)


def area_pool(x, size):
    """Area downsampling of (B, C, H, W) to (size, size). avg_pool2d where size divides H (its
    backward is deterministic and fast on CUDA), else adaptive pooling, the same operation."""
    H = x.shape[-1]
    if H == size:
        return x
    return F.avg_pool2d(x, H // size) if H % size == 0 else F.adaptive_avg_pool2d(x, size)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map, as ViTDet's feature pyramid uses."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# 2. Transformer block


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        """x (B, L, D); mask None or bool (L, L), True = query (row) may see key (column)."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # 3x (B, H, L, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))       # (B, L, D)


def scale_mask(scales, attention):
    """HieraTok's attention: a boolean (L, L) mask from each token's scale index over the
    coarse-to-fine sequence; True = query (row) may see key (column). 'causal' (the paper's): a
    token sees its own scale and every coarser one; 'independent': its own scale only. None for
    'full' attention or a single scale, so SDPA runs its fastest unmasked kernel."""
    if attention == "full" or len(scales) == 1:
        return None
    idx = torch.cat([torch.full((s * s,), i) for i, s in enumerate(scales)])  # (L,)
    return idx[None, :] <= idx[:, None] if attention == "causal" else idx[None, :] == idx[:, None]


class MLP(nn.Module):
    def __init__(self, dim, hidden, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm ViT block (the paper's Appendix E: no qkv or MLP bias, LayerNorm eps 1e-6; the
    attention's output projection keeps its bias, as in ViT)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, drop_path=0.0, bias=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio), bias=bias)
        self.drop_path = StochasticDepth(drop_path, "row")   # drops a sample's whole branch

    def forward(self, x, mask=None):
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_vit(module):
    """ViT initialisation (the paper: truncated normal, std 0.02) of linears, convs; zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# 3. Configuration: one dataclass per model (the DiT's is in section 9); presets (section 11) are
#    dicts of overrides; every field is a train.py flag (bar the DiT's latent shape, which its
#    tokenizer gives), its help given with the field


def flag(default, help):
    """A config field with its command-line help (runtime.add_config_flags makes the flag)."""
    return field(default=default, metadata={"help": help})


def out_of_range(v, low, high=math.inf, above=False, integer=False):
    """'' if v lies in [low, high) ((low, high) when `above`), else what it must be, in words: the
    one range rule of config fields (check_ranges) and of runtime.py's numeric flags."""
    if ((v > low) if above else (v >= low)) and v < high:
        return ""
    bound = (f"in {'(' if above else '['}{low}, {high})" if high < math.inf
             else f"{'>' if above else '>='} {low}")
    return ("an integer " if integer else "a finite number " if high == math.inf else "") + bound


def check_ranges(cfg, prefix=""):
    """Refuse a config field outside its range, naming its flag (--<prefix><field>): integers
    >= 1, drop_path and class_dropout in [0, 1), mlp_ratio > 0, the loss weights finite, >= 0."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if f.type is int:
            why = out_of_range(v, 1, integer=True)
        elif f.type is float:
            why = out_of_range(v, 0, *((1,) if f.name in ("drop_path", "class_dropout") else ()),
                               above=f.name == "mlp_ratio")
        if f.type in (int, float) and why:
            raise ValueError(f"{f.name} {v!r} (--{prefix}{f.name}) is out of range: it must be "
                             f"{why}")


@dataclass
class HieraTokConfig:
    image_size: int = flag(256, "input resolution (square)")
    patch_size: int = flag(16, "encoder patch; the latent grid is image_size / patch_size")
    enc_depth: int = flag(6, "encoder blocks")
    enc_dim: int = flag(768, "encoder width")
    enc_heads: int = flag(12, "encoder attention heads")
    dec_depth: int = flag(24, "decoder blocks")
    dec_dim: int = flag(1024, "decoder width")
    dec_heads: int = flag(16, "decoder attention heads")
    mlp_ratio: float = flag(4.0, "MLP hidden = mlp_ratio * width")
    drop_path: float = flag(0.1, "decoder stochastic depth (the encoder has none, as the paper)")
    latent_dim: int = flag(16, "d, channels of the KL latent z")
    scales: tuple = flag((1, 2, 4, 8, 16), "token-map sides, coarse to fine, ending at the grid")
    downsampler: str = flag("conv", "conv (learned, ViTDet-style) | interp (area pooling)")
    attention: str = flag("causal", "causal | independent | full")
    l1_weight: float = flag(1.0, "per-pixel L1")
    mse_weight: float = flag(0.4, "per-pixel MSE")
    lpips_weight: float = flag(1.0, "LPIPS, on scales of at least LPIPS_MIN_SIZE[lpips_net] px")
    lpips_net: str = flag("vgg", "LPIPS backbone: vgg (the paper's, LDM's) | alex (cheaper)")
    kl_weight: float = flag(1e-6, "KL weight in LDM's units (see generator_loss)")
    coarse_weight: float = flag(1.0, "multiplies every coarser scale's weight (scale_weights)")
    scale_weighting: str = flag("pixels", "coarse scale s's weight: pixels (s/S)^2, LDM's | "
                                          "equal 1")

    def __post_init__(self):
        check_ranges(self)
        self.scales = tuple(int(s) for s in self.scales)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}; pick sizes with image_size = k * patch_size")
        for name in ("enc", "dec"):
            dim, heads = getattr(self, f"{name}_dim"), getattr(self, f"{name}_heads")
            if dim % heads:
                raise ValueError(f"{name}_dim {dim} is not divisible by {name}_heads {heads}")
        if any(b <= a for a, b in zip(self.scales, self.scales[1:])) or self.scales[0] < 1:
            raise ValueError(f"scales {list(self.scales)} must be positive and strictly increasing "
                             f"(coarse to fine)")
        if self.scales[-1] != self.grid:
            raise ValueError(f"scales {list(self.scales)} must end with the full latent grid "
                             f"{self.grid} (image_size / patch_size)")
        for name, allowed in (("downsampler", ("conv", "interp")),
                              ("lpips_net", tuple(LPIPS_MIN_SIZE)),
                              ("attention", ("causal", "independent", "full")),
                              ("scale_weighting", ("pixels", "equal"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; use one of "
                                 f"{', '.join(allowed)}")

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def num_tokens(self):
        return sum(s * s for s in self.scales)

    @property
    def scale_weights(self):
        """Each scale's reconstruction-loss weight, coarse to fine. The full resolution is the
        primary objective at weight 1 in every arm (Appendix B); each coarser scale s of S adds
        its own term at coarse_weight times
          pixels: (s/S)^2, its share of the image's values: LDM's loss, a sum over an image's
                  values, called once per scale (the default, in the KL weight's units)
          equal:  1, each scale's per-pixel mean as strong as the full resolution's.
        So single- and multi-scale arms differ only by the coarse terms."""
        S = self.grid
        share = lambda s: (s / S) ** 2 if self.scale_weighting == "pixels" else 1.0
        return tuple(self.coarse_weight * share(s) for s in self.scales[:-1]) + (1.0,)


# ----------------------------------------------------------------------------------------------
# 4. Encoder


class Encoder(nn.Module):
    """(B, 3, H, W) -> posterior moments (B, 2d, S, S) with S = H / patch_size."""

    def __init__(self, cfg):
        super().__init__()
        self.grid = cfg.grid
        self.patch_embed = nn.Conv2d(3, cfg.enc_dim, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2, cfg.enc_dim))
        self.blocks = nn.ModuleList(Block(cfg.enc_dim, cfg.enc_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.enc_depth))
        self.norm = nn.LayerNorm(cfg.enc_dim, eps=1e-6)
        self.to_moments = nn.Linear(cfg.enc_dim, 2 * cfg.latent_dim)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed     # (B, S*S, D)
        for blk in self.blocks:
            x = blk(x)
        m = self.to_moments(self.norm(x))                                       # (B, S*S, 2d)
        return m.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)  # (B, 2d, S, S)


# ----------------------------------------------------------------------------------------------
# 5. Downsampler


class ScaleDown(nn.Module):
    """One coarse scale of the learned pyramid, (B, D, S, S) -> (B, D, s, s): three convolutions
    as in ViTDet's simple feature pyramid, a depthwise resampling conv (kernel = stride = S/s when
    s divides S, else a valid conv of kernel S-s+1, so any s < S works), then a 1x1 and a 3x3
    conv, each followed by a LayerNorm2d."""

    def __init__(self, dim, S, s):
        super().__init__()
        kernel, stride = (S // s, S // s) if S % s == 0 else (S - s + 1, 1)
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, kernel, stride=stride, groups=dim, bias=False),
            LayerNorm2d(dim, eps=1e-6),
            nn.Conv2d(dim, dim, 1, bias=False), LayerNorm2d(dim, eps=1e-6),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False), LayerNorm2d(dim, eps=1e-6))
        # The convs read channels-last maps (h and LayerNorm2d's outputs are permuted views), so
        # the depthwise and 1x1 weights, whose size-1 dims allow either layout for the same
        # storage, get channels-last gradients; giving the weights that layout (same values)
        # keeps their gradients' strides equal to theirs, as DDP's gradient buckets expect.
        for conv in self.net[0], self.net[2]:
            conv.to(memory_format=torch.channels_last)

    def forward(self, h):
        return self.net(h)


class Downsampler(nn.Module):
    """Full-resolution token map h (B, D, S, S) -> list of maps (B, D, s, s), coarse to fine, for
    the first k scales; the finest, when all are asked, is h itself. 'interp' is area pooling."""

    def __init__(self, cfg):
        super().__init__()
        self.scales, self.mode = cfg.scales, cfg.downsampler
        if self.mode == "conv":
            self.down = nn.ModuleList(ScaleDown(cfg.dec_dim, cfg.grid, s) for s in cfg.scales[:-1])

    def forward(self, h, k):
        n = len(self.scales)
        coarse = range(min(k, n - 1))                        # the coarser scales asked for
        if self.mode == "interp":
            maps = [area_pool(h, self.scales[i]) for i in coarse]
        else:
            maps = [self.down[i](h) for i in coarse]
        return maps + [h] if k == n else maps


# ----------------------------------------------------------------------------------------------
# 6. Decoder


class Decoder(nn.Module):
    """Coarse-to-fine token sequence (B, L, D) -> one image per scale, coarse to fine.
    Progressive decoding: under causal (or independent) attention the first k scales' outputs
    depend only on the first k token maps, so the sequence may be that prefix alone: the mask's
    top-left block is the prefix's own mask, and its k images are the full decode's (to float
    rounding; full attention has no such prefix)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.dec_dim, cfg.patch_size
        self.blocks = nn.ModuleList(
            Block(D, cfg.dec_heads, cfg.mlp_ratio, cfg.drop_path * i / max(cfg.dec_depth - 1, 1))
            for i in range(cfg.dec_depth))
        self.to_image = nn.ModuleList(          # each scale's head: its tokens -> its patches
            nn.Sequential(nn.LayerNorm(D, eps=1e-6), nn.Linear(D, p * p * 3)) for _ in cfg.scales)
        self.register_buffer("mask", scale_mask(cfg.scales, cfg.attention), persistent=False)
        self.bounds = [0]                                    # per-scale offsets in the sequence
        for s in cfg.scales:
            self.bounds.append(self.bounds[-1] + s * s)

    def forward(self, tokens):
        """-> (images, head_input): images (B, 3, s*p, s*p) for each scale in the sequence, and
        the last one's head input (B, s*s, D), the LayerNorm output its linear layer reads."""
        L = tokens.shape[1]
        if L not in self.bounds[1:]:
            raise ValueError(f"{L} tokens is not a whole number of scales; prefix lengths are "
                             f"{self.bounds[1:]} for scales {list(self.cfg.scales)}")
        k = self.bounds.index(L)                             # the scales the sequence holds
        mask = self.mask[:L, :L] if self.mask is not None else None
        x = tokens
        for blk in self.blocks:
            x = blk(x, mask)
        head_inputs = [norm(x[:, a:b]) for (norm, _), a, b in      # (B, s*s, D) per scale
                       zip(self.to_image, self.bounds[:k], self.bounds[1:k + 1])]
        images = [unpatchify(linear(h), self.cfg.patch_size, s)   # (B, 3, s*p, s*p) per scale
                  for (_, linear), h, s in zip(self.to_image, head_inputs, self.cfg.scales)]
        return images, head_inputs[-1]


# ----------------------------------------------------------------------------------------------
# 7. Tokenizer


class Output(NamedTuple):
    """What HieraTok.forward returns, whatever its arguments."""
    recons: list                     # one image (B, 3, s*p, s*p) per scale, coarse to fine
    mean: torch.Tensor               # posterior mean (B, d, S, S)
    logvar: torch.Tensor             # posterior log-variance (B, d, S, S)
    z: torch.Tensor                  # the latent decoded (B, d, S, S): a sample, or the mean
    head_input: torch.Tensor         # the finest head's input (B, S*S, D): see head_weight_grad


class HieraTok(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, S = cfg.dec_dim, cfg.grid
        self.encoder = Encoder(cfg)
        self.latent_proj = nn.Linear(cfg.latent_dim, D)                 # z -> decoder width
        self.downsampler = Downsampler(cfg)
        self.pos_table = nn.Parameter(torch.zeros(1, D, S, S))          # at the full grid
        self.scale_embed = nn.Parameter(torch.zeros(len(cfg.scales), D))  # one embedding per scale
        self.decoder = Decoder(cfg)
        init_vit(self)
        for table in (self.encoder.pos_embed, self.pos_table, self.scale_embed):
            nn.init.trunc_normal_(table, std=0.02)

    def no_weight_decay(self):
        """Parameters that AdamW must not decay besides 1-D ones: the position and scale tables."""
        return {"encoder.pos_embed", "pos_table", "scale_embed"}

    def encode(self, x, sample=True):
        """x (B, 3, H, W) in [-1, 1] -> (mean, logvar, z), each (B, d, S, S); z = mean + std *
        N(0, I) when `sample`, else the mean."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)                   # as in LDM: exp() stays finite
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if sample else mean
        return mean, logvar, z

    def num_scales(self, upto=None):
        """How many scales to decode: all for None, else `upto`, refused unless it is 1 to n (the
        scale count), and under full attention unless it is n (see Decoder)."""
        n = len(self.cfg.scales)
        if upto is None:
            return n
        if upto not in range(1, n + 1):
            raise ValueError(f"upto={upto!r}: decode the first 1 to {n} scales (leave it out for "
                             f"all of them)")
        if upto < n and self.cfg.attention == "full":
            raise ValueError("progressive decoding needs causal or independent attention: under "
                             "full attention coarse outputs depend on finer tokens")
        return upto

    def tokens(self, z, upto=None):
        """z (B, d, S, S) -> coarse-to-fine decoder tokens (B, L, D), L = sum(s*s) over the first
        `upto` scales (all by default; see num_scales)."""
        h = self.latent_proj(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, D, S, S)
        seq = []
        for i, m in enumerate(self.downsampler(h, self.num_scales(upto))):
            s = m.shape[-1]
            pos = area_pool(self.pos_table, s) + self.scale_embed[i][:, None, None]  # (1, D, s, s)
            seq.append((m + pos).flatten(2).transpose(1, 2))             # (B, s*s, D)
        return torch.cat(seq, dim=1)

    def decode(self, z, upto=None):
        """z (B, d, S, S) -> list of images, one per scale decoded, coarse to fine.
        With `upto` = k only the first k scales' tokens are built and decoded (progressive
        decoding, see Decoder), at a fraction of the cost."""
        return self.decoder(self.tokens(z, upto))[0]

    def forward(self, x, sample=True):
        """Images (B, 3, H, W) -> Output(recons, mean, logvar, z, head_input)."""
        mean, logvar, z = self.encode(x, sample)
        recons, head_input = self.decoder(self.tokens(z))
        return Output(recons, mean, logvar, z, head_input)


# ----------------------------------------------------------------------------------------------
# 8. Losses


def reconstruction_loss(cfg, x, recons, lpips=None):
    """HieraTok's supervision of every scale: l1, mse and lpips_weight (the paper's 1, 0.4, 1)
    times L1, MSE and LPIPS (per-pixel means; LPIPS on scales of LPIPS_MIN_SIZE and up) of each
    scale's image against the input area-downsampled to its size; the scales' terms weighted by
    cfg.scale_weights and summed -> (rec, terms): rec the weighted sum, terms every term per scale
    (rec_s<s>), detached."""
    terms, rec, min_size = {}, 0.0, LPIPS_MIN_SIZE[cfg.lpips_net]
    for s, r, w in zip(cfg.scales, recons, cfg.scale_weights):
        target = area_pool(x, r.shape[-1])
        r = r.float()
        l1, mse = (r - target).abs().mean(), (r - target).square().mean()
        scale_term = cfg.l1_weight * l1 + cfg.mse_weight * mse
        terms[f"l1_s{s}"], terms[f"mse_s{s}"] = l1.detach(), mse.detach()
        if lpips is not None and cfg.lpips_weight > 0 and r.shape[-1] >= min_size:
            lp = lpips(r, target).mean()
            scale_term = scale_term + cfg.lpips_weight * lp
            terms[f"lpips_s{s}"] = lp.detach()
        terms[f"rec_s{s}"] = scale_term.detach()
        rec = rec + w * scale_term
    terms["rec"] = rec.detach()
    return rec, terms


def kl_divergence(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over latent elements, averaged over the batch."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()


class Discriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): strided 4x4 convs to a map of real/fake logits. GroupNorm in
    place of BatchNorm: no batch statistics to synchronise across ranks, the same in train and
    eval."""

    def __init__(self, ch=64, n_layers=3):
        super().__init__()
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)], ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_out, 4, 2 if i < n_layers else 1, 1, bias=False),
                       nn.GroupNorm(32, c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x):
        return self.net(x)


def gan_ramp(step, start, length):
    """The adversarial term's factor at `step` from `start` on (train.py gates both the term and
    the discriminator's training at `start`, as LDM): a linear ramp over `length` steps to 1
    (ours; LDM jumps to 1)."""
    return min(1.0, (step - start + 1) / max(1, length))


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(g_rec, g_other, max_weight):
    """VQGAN's balance from two gradients at one last layer: ||grad rec|| / ||grad other||, so the
    adversarial (or VF) term neither swamps nor vanishes next to the reconstruction term; clamped
    at max_weight (see generator_loss for the caps in our units)."""
    return (g_rec.norm() / (g_other.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def head_weight_grad(loss, image, head_input, patch):
    """d loss / d W for W the linear weight of the finest head, which made `image` (B, 3, H, W)
    from `head_input` (B, N, D), by the chain rule through that one layer: W.grad = sum over tokens
    of output gradient x input, the output gradient being the image's gradient cut into patches.
    Autograd stops at the image: asking it for W.grad gives the same numbers, but under
    torch.compile it runs the model's whole compiled backward for them, twice per step."""
    g = torch.autograd.grad(loss, image, retain_graph=True)[0]            # (B, 3, H, W)
    g = patchify(g.float(), patch).flatten(0, 1)                          # (B*N, p*p*3)
    return g.T @ head_input.detach().float().flatten(0, 1)                # (p*p*3, D), as W


class VFLoss(nn.Module):
    """VA-VAE's vision-foundation alignment (the scaled-up recipe), as its code has it: the sampled
    latent z, projected by a 1x1 layer without bias, against a frozen network's patch features
    (images (B, 3, H, W) in [-1, 1] -> (B, N, C); runtime.DINOv2Features), resized to the latent
    grid where theirs differs: relu(1 - m1 - cos(z'_i, f_i)) per position, plus
    relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2) across positions."""

    def __init__(self, features, feat_dim, latent_dim, m_cos=0.5, m_dist=0.25):
        super().__init__()
        self.features = features.eval().requires_grad_(False)
        self.proj = nn.Linear(latent_dim, feat_dim, bias=False)
        self.m_cos, self.m_dist = m_cos, m_dist

    def no_weight_decay(self):
        """The projection is not decayed: VA-VAE trains it with Adam, without weight decay."""
        return {"proj.weight"}

    def train(self, mode=True):                              # the feature net stays in eval mode
        super().train(mode)
        self.features.eval()
        return self

    def target(self, x, grid):
        """Frozen features of x resized to the latent grid: (B, grid*grid, C), no gradient."""
        with torch.no_grad():
            f = self.features(x).float()                     # (B, N, C)
            n = int(round(math.sqrt(f.shape[1])))
            f = f.transpose(1, 2).reshape(f.shape[0], -1, n, n)  # (B, C, n, n)
            if n != grid:
                f = F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False)
        return f.flatten(2).transpose(1, 2)                  # (B, grid*grid, C)

    def forward(self, z, x):
        zp = F.normalize(self.proj(z.flatten(2).transpose(1, 2).float()), dim=-1)  # (B, N, C)
        f = F.normalize(self.target(x, z.shape[-1]), dim=-1)                        # (B, N, C)
        l_cos = F.relu(1.0 - self.m_cos - (zp * f).sum(-1)).mean()
        gap = (zp @ zp.transpose(1, 2) - f @ f.transpose(1, 2)).abs()            # (B, N, N)
        l_dist = F.relu(gap - self.m_dist).mean()
        return l_cos + l_dist


def generator_loss(cfg, x, out, lpips=None, vf=None, vf_weight=0.0, vf_layer=None, disc=None,
                   gan_weight=0.0):
    """The tokenizer's objective on a forward pass `out` of images x -> (loss, terms): every
    scale's reconstruction + the KL (stage 1), + the VF term at VA-VAE's adaptive weight (at
    `vf_layer`, the encoder's last layer) x vf_weight, + the adversarial term of the frozen `disc`
    at VQGAN's adaptive weight (at the finest head's linear layer) x gan_weight (stage 2: this
    step's, --gan_weight times its ramp).

    Units are LDM's (the paper's loss weights are in them): LDM sums the reconstruction over an
    image's 3·H·W values and the KL over its latent elements. Here every reconstruction term is a
    per-pixel mean and the per-image KL is divided by 3·H·W: for one scale, LDM's objective over
    3·H·W, a loss scale that suits Adam and clipping. Both adaptive weights balance their term
    against the reconstruction alone, without the KL, as LDM (GAN) and VA-VAE (VF) do; their
    caps, LDM's 1e4 and VA-VAE's 1e8 on the summed loss, are divided by 3·H·W here."""
    rec, terms = reconstruction_loss(cfg, x, out.recons, lpips)
    kl = kl_divergence(out.mean.float(), out.logvar.float())           # per image, summed
    H, W = x.shape[-2:]
    loss = rec + cfg.kl_weight * kl / (3 * H * W)                       # LDM's units
    terms["kl"] = kl.detach()
    if vf is not None:
        vf_loss = vf(out.z, x)
        grads = [torch.autograd.grad(t, vf_layer, retain_graph=True)[0] for t in (rec, vf_loss)]
        w = adaptive_weight(*grads, max_weight=1e8 / (3 * H * W)) * vf_weight
        loss = loss + w * vf_loss
        terms.update(vf_loss=vf_loss.detach(), vf_w=w)
    if disc is not None:
        disc.requires_grad_(False)                           # the generator step moves G only
        g_loss = -disc(out.recons[-1]).float().mean()
        disc.requires_grad_(True)
        grads = [head_weight_grad(t, out.recons[-1], out.head_input, cfg.patch_size)
                 for t in (rec, g_loss)]
        w = adaptive_weight(*grads, max_weight=1e4 / (3 * H * W)) * gan_weight
        loss = loss + w * g_loss
        terms.update(g_loss=g_loss.detach(), gan_w=w)
    return loss, terms


# ----------------------------------------------------------------------------------------------
# 9. DiT (Peebles & Xie, 2023)


@dataclass
class DiTConfig:
    input_size: int = flag(16, "latent grid side (the tokenizer's image_size / patch_size)")
    in_channels: int = flag(16, "latent channels d")
    patch_size: int = flag(1, "DiT patch on the latent; 1 on 16x16 gives 256 tokens")
    depth: int = flag(28, "blocks")
    dim: int = flag(1152, "width")
    heads: int = flag(16, "attention heads")
    mlp_ratio: float = flag(4.0, "MLP hidden = mlp_ratio * width")
    num_classes: int = flag(IMAGENET_CLASSES, "class labels; index num_classes is the null class")
    class_dropout: float = flag(0.1, "label dropout in training, for classifier-free guidance")
    objective: str = flag("ddpm", "ddpm (vanilla DiT's, the paper's testbed: noise and learned "
                                  "variance, 250-step sampler) | flow (velocity, ODE sampler)")

    def __post_init__(self):
        check_ranges(self, "dit_")
        if self.objective not in ("ddpm", "flow"):
            raise ValueError(f"unknown objective {self.objective!r}; use one of ddpm, flow")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT patch_size {self.patch_size} does not divide the latent grid "
                             f"{self.input_size}")
        if self.dim % self.heads or self.dim % 4:
            raise ValueError(f"DiT dim {self.dim} must be divisible by heads {self.heads} and by 4 "
                             f"(sin-cos position table)")


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features of scale * t -> MLP -> (B, D). DiT's frequency range is that of
    DDPM's step numbers 0-999 (scale 1); flow matching's t in [0, 1] is scaled by 1000."""

    def __init__(self, dim, scale, freq_dim=256):
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        k = torch.arange(half, device=t.device, dtype=torch.float32)
        freqs = torch.exp(-math.log(10000) * k / half)
        args = self.scale * t.float()[:, None] * freqs[None]              # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN(c).chunk(6, dim=1)       # 6x (B, D)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    """(x_t (B, C, H, W), t (B,), labels y (B,)) -> the predicted noise and a variance
    interpolation, (B, 2C, H, W), for DDPM (t the step number 0-999), or the velocity, (B, C, H, W),
    for flow matching (t in [0, 1]). It also holds the per-channel latent statistics (buffers,
    saved with it): `normalize` before training, `denormalize` after sampling."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, p, C = cfg.dim, cfg.patch_size, cfg.in_channels
        self.grid = cfg.input_size // p
        self.out_channels = 2 * C if cfg.objective == "ddpm" else C
        self.x_embed = nn.Conv2d(C, D, p, stride=p)
        self.t_embed = TimestepEmbedder(D, scale=1 if cfg.objective == "ddpm" else 1000)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, D)               # last row: the null class
        self.register_buffer("pos_embed", sincos_2d(D, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))
        self.head = nn.Linear(D, p * p * self.out_channels)
        self.register_buffer("latent_mean", torch.zeros(1, C, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, C, 1, 1))
        self.initialize()

    def no_weight_decay(self):
        """Parameters that AdamW must not decay besides 1-D ones: the label embedding table."""
        return {"y_embed.weight"}

    def initialize(self):
        """All of DiT's initialisation in one place."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embed.weight                                           # patch embed as a linear
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for m in self.t_embed.mlp[0::2]:
            nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: every modulation and the output layer start at zero, so each block's gates are
        # zero (the block is the identity) and the model's first prediction is exactly 0. This is
        # what lets deep DiTs train stably from the first step.
        for layer in [blk.adaLN[-1] for blk in self.blocks] + [self.adaLN_final[-1], self.head]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        x = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, L, D)
        c = self.t_embed(t) + self.y_embed(y)                            # (B, D)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        x = self.head(modulate(self.norm_final(x), shift, scale))        # (B, L, p*p*C_out)
        return unpatchify(x, self.cfg.patch_size, self.grid, self.out_channels)  # (B, C_out, H, W)

    def set_latent_stats(self, mean, std):
        """Per-channel statistics (C,) of the tokenizer's latents on training data."""
        self.latent_mean.copy_(mean.view(1, -1, 1, 1))
        self.latent_std.copy_(std.view(1, -1, 1, 1).clamp_min(1e-6))

    def normalize(self, z):
        return (z - self.latent_mean) / self.latent_std

    def denormalize(self, x):
        return x * self.latent_std + self.latent_mean


# ----------------------------------------------------------------------------------------------
# 10. The DiT's objectives and samplers. DDPM, vanilla DiT's (the paper's testbed): 1,000 steps,
#     linear betas, the noise predicted with a learned variance, 250 respaced ancestral sampling
#     steps. Flow matching: x_t = (1 - t) x0 + t eps (t = 0 data, t = 1 noise), velocity target
#     eps - x0, an Euler or Heun ODE sampler. Sample i's noise comes from its own seed, whatever the
#     batch or the number of GPUs.

DDPM_STEPS = 1000
SAMPLING_STEPS = {"ddpm": 250, "flow": 50}    # each sampler's default (DiT's 250; 50 ODE steps)


def drop_labels(cfg, y):
    """Labels replaced by the null class with the config's class_dropout probability (for CFG)."""
    if cfg.class_dropout == 0:
        return y
    drop = torch.rand(y.shape[0], device=y.device) < cfg.class_dropout
    return torch.where(drop, torch.full_like(y, cfg.num_classes), y)


def guided_output(model, x, t, y, guidance=1.0):
    """The model's output with classifier-free guidance of scale w = `guidance` on its first C
    channels, all of the latent's (the velocity, or the predicted noise): out_u + w (out_c -
    out_u); a learned variance (DDPM's other C channels) is the conditional prediction's, as in
    DiT. The conditional output alone when w = 1, at half the cost."""
    if guidance == 1.0:
        return model(x, t, y)
    null = torch.full_like(y, model.cfg.num_classes)
    out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    C = x.shape[1]
    return torch.cat([out_u[:, :C] + guidance * (out_c[:, :C] - out_u[:, :C]), out_c[:, C:]], 1)


def generators(seeds):
    """One CPU random generator per sample, seeded by that sample's seed alone: sample i's noise is
    the same whatever the batch it is in or the number of GPUs."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def seeded_noise(gens, shape, device="cpu"):
    """One N(0, I) tensor of `shape` per sample, from its own generator (see generators)."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)


class Schedule(NamedTuple):
    """A DDPM's tables over its steps, float64 (T,), as DiT computes them."""
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    posterior_logvar: torch.Tensor       # log var of q(x_{t-1} | x_t, x_0); at t = 0, t = 1's
    coef_x0: torch.Tensor                # q(x_{t-1} | x_t, x_0)'s mean: coef_x0 x_0 + coef_xt x_t
    coef_xt: torch.Tensor


@functools.lru_cache
def ddpm_schedule(steps=DDPM_STEPS, device="cpu"):
    """The 1,000-step process (linear betas 1e-4 .. 0.02), or `steps` of its steps evenly
    respaced (0 and 999 included), which keep their cumulative alphas: the respaced betas follow
    from them, 1 - abar_k / abar_(the kept step before). -> (Schedule on `device`, the kept steps'
    numbers)."""
    if not 2 <= steps <= DDPM_STEPS:                  # one step would keep step 0 alone: no noise
        raise ValueError(f"DDPM samples with 2 to {DDPM_STEPS} steps, not {steps}")
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, DDPM_STEPS, dtype=torch.float64), 0)
    kept, at_step = [], 0.0          # DiT's rule: the stride summed in floating point, then
    for _ in range(steps):           # rounded (21 steps keep 499 where i * 999 / 20 gives 500)
        kept.append(round(at_step))
        at_step += (DDPM_STEPS - 1) / (steps - 1)
    abar = abar[kept]
    prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / prev
    var = betas * (1 - prev) / (1 - abar)
    sched = Schedule(betas, abar, torch.cat([var[1:2], var[1:]]).log(),
                     betas * prev.sqrt() / (1 - abar), (1 - prev) * (1 - betas).sqrt() / (1 - abar))
    return Schedule(*[table.to(device) for table in sched]), kept


def at(table, t):
    """table[t] per sample (t: (B,) step indices on the table's device) as float32 (B, 1, 1, 1),
    the float64 table's value rounded once."""
    return table[t].float().view(-1, 1, 1, 1)


def ddpm_noised(sched, x0, t, eps):
    """q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    abar = sched.alphas_cumprod
    return at(abar.sqrt(), t) * x0 + at((1 - abar).sqrt(), t) * eps


def ddpm_gaussian(sched, xt, t, eps, v):
    """The model's p(x_{t-1} | x_t) from its predicted noise eps and variance interpolation v, each
    (B, C, H, W), t the steps' indices in sched's tables (their numbers on the 1,000-step schedule)
    -> (mean, log variance). The mean is the posterior's at the predicted x_0 (not clipped); the
    log variance runs from the posterior's (v = -1) to log beta_t (v = 1), v not clamped."""
    abar = sched.alphas_cumprod
    x0 = at((1 / abar).sqrt(), t) * xt - at((1 / abar - 1).sqrt(), t) * eps
    mean = at(sched.coef_x0, t) * x0 + at(sched.coef_xt, t) * xt
    frac = (v + 1) / 2
    return mean, frac * at(sched.betas.log(), t) + (1 - frac) * at(sched.posterior_logvar, t)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp logvar1) || N(mean2, exp logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 - 1 + (logvar1 - logvar2).exp()
                  + (mean1 - mean2).square() * (-logvar2).exp())


def discretized_log_likelihood(x, mean, log_std):
    """log P(x), elementwise, of a Gaussian discretised to 256 bins of width 2/255 on [-1, 1], the
    edge bins open, each bin's probability floored at 1e-12 as in DiT; with the exact normal CDF,
    where DiT's code uses a tanh approximation of it."""
    lo, hi = (x - mean - 1 / 255) / log_std.exp(), (x - mean + 1 / 255) / log_std.exp()
    cdf = torch.special.ndtr
    p = torch.where(x < -0.999, cdf(hi), torch.where(x > 0.999, cdf(-lo), cdf(hi) - cdf(lo)))
    return p.clamp_min(1e-12).log()


def ddpm_vb(sched, x0, xt, t, eps, v):
    """The variational bound's term at step t in bits per dimension, per sample (B,): the KL
    between the true posterior q(x_{t-1} | x_t, x_0) and the model's Gaussian for t > 0, the
    discretised likelihood of x_0 under it for t = 0."""
    mean, logvar = ddpm_gaussian(sched, xt, t, eps, v)
    true_mean = at(sched.coef_x0, t) * x0 + at(sched.coef_xt, t) * xt
    kl = normal_kl(true_mean, at(sched.posterior_logvar, t), mean, logvar).mean((1, 2, 3))
    nll = -discretized_log_likelihood(x0, mean, 0.5 * logvar).mean((1, 2, 3))
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def ddpm_loss(model, cfg, x0, y):
    """Vanilla DiT's objective on normalised latents x0 (B, C, H, W), labels y (B,): t uniform on
    the 1,000 steps, the mean squared error of the predicted noise, plus the variational term
    (not rescaled) with the predicted noise detached, so that it trains only the variance."""
    sched = ddpm_schedule(device=x0.device)[0]
    t = torch.randint(0, DDPM_STEPS, (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    xt = ddpm_noised(sched, x0, t, eps)
    eps_pred, v = model(xt, t, drop_labels(cfg, y)).float().chunk(2, dim=1)
    mse = (eps_pred - eps).square().mean((1, 2, 3))
    return (mse + ddpm_vb(sched, x0, xt, t, eps_pred.detach(), v)).mean()


@torch.no_grad()
def ddpm_sample(model, y, seeds, steps, guidance=1.0):
    """Ancestral sampling over `steps` of the 1,000 steps, evenly respaced (DiT's 250): at each
    kept step, from the model's Gaussian (learned variance, x_0 not clipped) with each sample's own
    noise, none at the last. The model sees a kept step's own number (0-999); the respaced tables
    are read at its index among the kept steps."""
    cfg = model.cfg
    sched, kept = ddpm_schedule(steps, y.device)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    gens = generators(seeds)
    x = seeded_noise(gens, shape, y.device)
    for i in reversed(range(steps)):
        number = torch.full((len(x),), kept[i], device=x.device)
        eps, v = guided_output(model, x, number, y, guidance).float().chunk(2, dim=1)
        mean, logvar = ddpm_gaussian(sched, x, torch.full_like(number, i), eps, v)
        x = mean + (0.5 * logvar).exp() * seeded_noise(gens, shape, x.device) if i > 0 else mean
    return model.denormalize(x)


def flow_matching_loss(model, cfg, x0, y, t_dist="logit_normal"):
    """x0: normalised latents (B, C, H, W); y: labels (B,). Returns the mean squared velocity
    error, t logit-normal (or uniform) on [0, 1]."""
    B = x0.shape[0]
    t = torch.sigmoid(torch.randn(B, device=x0.device)) if t_dist == "logit_normal" else \
        torch.rand(B, device=x0.device)
    eps = torch.randn_like(x0)
    tb = t.view(B, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    return (model(xt, t, drop_labels(cfg, y)).float() - (eps - x0).float()).square().mean()


def guided_velocity(model, x, t, y, guidance=1.0, interval=(0.0, 1.0)):
    """The flow's velocity at time t (a float), guided while t lies in `interval`, conditional
    outside it."""
    tt = torch.full((x.shape[0],), t, device=x.device)
    return guided_output(model, x, tt, y, guidance if interval[0] <= t <= interval[1] else 1.0)


@torch.no_grad()
def flow_sample(model, y, seeds, steps, method="heun", guidance=1.0, interval=(0.0, 1.0)):
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 (data) with Euler or Heun steps."""
    cfg = model.cfg
    x = seeded_noise(generators(seeds), (cfg.in_channels, cfg.input_size, cfg.input_size),
                     y.device)
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        vel = guided_velocity(model, x, t, y, guidance, interval)
        x_next = x + (t_next - t) * vel
        if method == "heun" and t_next > 0:                  # trapezoidal, except into t = 0
            vel_next = guided_velocity(model, x_next, t_next, y, guidance, interval)
            x_next = x + (t_next - t) * 0.5 * (vel + vel_next)
        x = x_next
    return model.denormalize(x.float())


def dit_loss(model, cfg, x0, y, t_dist="logit_normal"):
    """The loss of the objective of `cfg`, the DiT's config (given apart from `model`, which may be
    wrapped by DDP or torch.compile): ddpm_loss, or flow_matching_loss."""
    if cfg.objective == "ddpm":
        return ddpm_loss(model, cfg, x0, y)
    return flow_matching_loss(model, cfg, x0, y, t_dist)


def sample_latents(model, y, seeds, steps=None, method="heun", guidance=1.0, interval=(0.0, 1.0)):
    """Latents, in the tokenizer's units, from the DiT's own sampler: DDPM's ancestral steps or the
    flow's ODE (`method` and `interval` are its own), SAMPLING_STEPS[objective] by default."""
    objective = model.cfg.objective
    steps = steps or SAMPLING_STEPS[objective]
    if objective == "ddpm":
        return ddpm_sample(model, y, seeds, steps, guidance)
    return flow_sample(model, y, seeds, steps, method, guidance, interval)


# ----------------------------------------------------------------------------------------------
# 11. Presets and optimizer groups


TOKENIZER_PRESETS = {
    "tiny": dict(image_size=32, patch_size=4, enc_depth=2, enc_dim=64, enc_heads=4, dec_depth=2,
                 dec_dim=64, dec_heads=4, drop_path=0.0, latent_dim=4, scales=(1, 2, 4, 8),
                 lpips_weight=0.0),
    # a stage-1 arm on 2 CPU cores (64 px, 8x8x16 latent, 85 decoder tokens) without LPIPS: at
    # that size LPIPS hides the multi-scale gain (--lpips_weight 1: AlexNet's, VGG 6x the step)
    "cpu-64": dict(image_size=64, patch_size=8, enc_depth=2, enc_dim=128, enc_heads=2,
                   dec_depth=4, dec_dim=192, dec_heads=3, drop_path=0.0, latent_dim=16,
                   scales=(1, 2, 4, 8), lpips_weight=0.0, lpips_net="alex"),
    # the paper's token geometry (341 tokens, scales 1..16) at 128 px, for one GPU
    "gpu-128": dict(image_size=128, patch_size=8, enc_depth=6, enc_dim=384, enc_heads=6,
                    dec_depth=12, dec_dim=512, dec_heads=8, drop_path=0.0, latent_dim=16),
    "paper-f16d16": dict(),                                   # the dataclass defaults: the paper
    "paper-f16d32": dict(latent_dim=32, kl_weight=1e-5),     # Table 2's f16d32 rows
}
TOKENIZER_PRESETS.update({                            # single-scale baselines: scales = (grid,)
    f"{name}-single": {**TOKENIZER_PRESETS[name],
                       "scales": (HieraTokConfig(**TOKENIZER_PRESETS[name]).grid,)}
    for name in ("cpu-64", "gpu-128", "paper-f16d16", "paper-f16d32")})
DIT_PRESETS = {"tiny": dict(depth=2, dim=64, heads=4), "S": dict(depth=12, dim=384, heads=6),
               "B": dict(depth=12, dim=768, heads=12), "L": dict(depth=24, dim=1024, heads=16),
               "XL": dict(depth=28, dim=1152, heads=16)}


def preset(table, name, **overrides):
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(table)}")
    return {**table[name], **overrides}


def tokenizer_config(name, **overrides):
    return HieraTokConfig(**preset(TOKENIZER_PRESETS, name, **overrides))


def dit_config(name, tok_cfg, **overrides):
    """A DiT preset sized for the latent of the tokenizer config `tok_cfg`."""
    return DiTConfig(**preset(DIT_PRESETS, name, input_size=tok_cfg.grid,
                              in_channels=tok_cfg.latent_dim, **overrides))


def param_groups(modules, weight_decay):
    """AdamW groups: weight decay on matrices, none on biases, norms (1-D) and the tables a model
    lists in no_weight_decay() (position, scale and label embeddings: decaying them pulls every
    position or class toward the same vector, not toward a simpler function)."""
    decay, no_decay = [], []
    for m in modules:
        skip = m.no_weight_decay() if hasattr(m, "no_weight_decay") else set()
        for name, q in m.named_parameters():
            if q.requires_grad:
                (no_decay if q.ndim < 2 or name in skip else decay).append(q)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# 12. FLOPs, forward, per image (a training step is about 3x): counted by torch on models built
#     on the meta device (shapes only: no memory, no arithmetic)


def count_flops(fn, *inputs):
    """FLOPs of fn(*inputs), a backward included if it runs one, by torch's FlopCounterMode:
    matmuls, convolutions and attention (on SDPA's math path, which it counts whatever the mask),
    a multiply-add as 2; elementwise work is not counted. A ViT block of L tokens, width D and MLP
    ratio 4 comes to 2 (12 L D^2 + 2 L^2 D)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops()


def tokenizer_flops(cfg):
    """A whole forward pass (encode, decode every scale), per image."""
    with torch.device("meta"):
        return count_flops(HieraTok(cfg).eval(), torch.zeros(1, 3, cfg.image_size, cfg.image_size))


def decoder_flops(cfg, upto=None):
    """Decoding z per image, over the first `upto` scales (all by default): HieraTok.decode."""
    with torch.device("meta"):
        z = torch.zeros(1, cfg.latent_dim, cfg.grid, cfg.grid)
        return count_flops(HieraTok(cfg).eval().decode, z, upto)


def dit_flops(cfg):
    """One network evaluation (DDPM's noise and variance, or the flow's velocity), per image;
    adaLN's projections act on one vector per sample."""
    with torch.device("meta"):
        x = torch.zeros(1, cfg.in_channels, cfg.input_size, cfg.input_size)
        return count_flops(DiT(cfg), x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
