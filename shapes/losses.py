"""Losses beside denoising: attention grounding (after TokenCompose), and the recorder that exposes
cross-attention probabilities to them with gradients.

TokenCompose (Wang et al., CVPR 2024) supervises each object token's cross-attention with the
object's segmentation mask; here the renderer gives the masks for free.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from shapes.config import Config


class AttentionStore:
    """Collects head-averaged cross-attention probabilities while `active`, with each one's layer name."""

    def __init__(self) -> None:
        self.active = False
        self.maps: list[torch.Tensor] = []  # (B, HW, T) per layer call, in forward order
        self.layers: list[str] = []  # diffusers' processor key of each map's layer

    def clear(self) -> None:
        """Drop the maps collected so far."""
        self.maps = []
        self.layers = []


class RecordingCrossAttnProcessor:
    """Cross-attention computed explicitly so its softmax can be recorded (with gradients)."""

    def __init__(self, store: AttentionStore, name: str) -> None:
        self.store = store
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Standard attention; stores mean-over-heads probabilities (B, HW, T) when active."""
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states)
        k = attn.to_k(context)
        v = attn.to_v(context)
        h = attn.heads
        q, k, v = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, k, v))  # (B, heads, L, d)
        scores = (q @ k.transpose(-1, -2)).float() * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)  # (B, heads, HW, T)
        if self.store.active:
            self.store.maps.append(probs.mean(dim=1))
            self.store.layers.append(self.name)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)  # (B, HW, heads * d)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def install_recorder(unet: UNet2DConditionModel, store: AttentionStore) -> None:
    """Route every cross-attention (`attn2`) of the UNet through a recording processor."""
    procs = {}
    for name, proc in unet.attn_processors.items():
        procs[name] = RecordingCrossAttnProcessor(store, name) if "attn2" in name else proc
    unet.set_attn_processor(procs)


def grounding_loss(
    maps: list[torch.Tensor],
    owner: torch.Tensor,
    masks16: torch.Tensor,
    keep: torch.Tensor,
    cfg: Config,
    step: int,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TokenCompose-style token + pixel losses plus background and ownership terms, layer mean.

    The ownership term is a per-pixel cross-entropy: of the attention a pixel inside object k
    gives to object words, the share going to object k's own words should be 1. It breaks the
    symmetric solution in which every object word attends to every object alike.

    The background term (attention that pixels outside every object give to object words) is
    switched off at `ground_bg_stop` (from the start in the recipe): at high noise no pixel can tell
    whether it lies inside an object, so it taught the model to ignore object words there, and the
    layout could not follow the text.

    maps: per cross-attention layer (B, HW, T) head-averaged probabilities; owner (B, T) object
    index per token (-1 none); masks16 (B, K, 16, 16) area fractions; keep (B,) bool, samples
    whose caption was not dropped; step: the training step (for the term schedules); allowed
    (B, T) bool, tokens that may be grounded (None: all).
    """
    bg_weight = cfg.ground_bg_weight if cfg.ground_bg_stop < 0 or step < cfg.ground_bg_stop else 0.0
    own_weight = cfg.ground_own_weight if step >= cfg.ground_own_start else 0.0
    k = masks16.shape[1]
    sel = (owner.unsqueeze(1) == torch.arange(k, device=owner.device).view(1, k, 1)).float() * keep.view(-1, 1, 1)
    if allowed is not None:
        sel = sel * allowed.unsqueeze(1).float()
    tok_any = sel.sum(1)  # (B, T) 1 where the token names an object
    has_words = (sel.sum(-1) > 0).float()  # (B, K) objects with a grounded word (kept captions only)
    n_tok = tok_any.sum().clamp(min=1.0)
    total_tok = total_pix = total_bg = total_own = torch.zeros((), device=owner.device)
    mass = 0.0
    for probs in maps:
        hw = probs.shape[1]
        side = math.isqrt(hw)
        m = masks16 if side == masks16.shape[-1] else F.adaptive_avg_pool2d(masks16, side)
        m = m.flatten(2)  # (B, K, HW)
        target = torch.einsum("bkt,bkp->bpt", sel, m)  # per token: its object's mask
        inside = (probs * target).sum(1)  # (B, T)
        total = probs.sum(1) + 1e-6
        frac = inside / total
        total_tok = total_tok + ((1 - frac) * tok_any).sum() / n_tok
        norm = probs / probs.amax(dim=1, keepdim=True).clamp(min=1e-6)
        bce = F.binary_cross_entropy(norm.clamp(1e-4, 1 - 1e-4), target.clamp(0, 1), reduction="none")
        total_pix = total_pix + (bce.mean(1) * tok_any).sum() / n_tok
        bg = (1 - m.sum(1)).clamp(min=0) * keep.view(-1, 1)  # (B, HW)
        on_objects = (probs * tok_any.unsqueeze(1)).sum(-1)  # (B, HW)
        total_bg = total_bg + (on_objects * bg).sum() / bg.sum().clamp(min=1.0)
        own = torch.einsum("bpt,bkt->bkp", probs, sel)  # attention to object k's words
        share = own / (on_objects.unsqueeze(1) + 1e-6)
        inside_w = m * has_words.unsqueeze(-1)
        total_own = total_own - (inside_w * torch.log(share + 1e-4)).sum() / inside_w.sum().clamp(min=1.0)
        mass += float((frac.detach() * tok_any).sum() / n_tok)
    n = len(maps)
    loss = (total_tok + cfg.ground_pixel_weight * total_pix + bg_weight * total_bg + own_weight * total_own) / n
    stats = {
        "g_tok": float(total_tok.detach()) / n,
        "g_pix": float(total_pix.detach()) / n,
        "g_bg": float(total_bg.detach()) / n,
        "g_own": float(total_own.detach()) / n,
        "mass_in": mass / n,
    }
    return loss, stats
