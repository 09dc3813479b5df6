"""ConceptAttention maps for FLUX.1 (Helbling et al., 2025), a second map family beside the cross-attention maps.

Each concept ("cat", "sky") is encoded by the pipeline's T5 (mean over its pieces), embedded by the transformer's
`context_embedder`, and carried through the double-stream blocks on the text path's own weights (adaLN
modulation, q/k/v, output projection, feed-forward). Concept queries attend to the concepts and the image
(never the prompt), and nothing attends to the concepts, so the image is unchanged. The map lives in the
attention **output** space: per pixel i,

    c(i, concept) = softmax over concepts of  o_i . o_concept

with o the attention outputs (heads concatenated, before the output projection), averaged over the double
blocks from 15/19 of the depth on (FLUX.1's blocks 15-18, as the paper) and stored per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

FIRST_BLOCK_FRACTION = 15 / 19  # ConceptAttention averages FLUX.1's double-stream blocks 15-18 of 0-18


def parse_concepts(text: str | list[str] | None) -> list[str]:
    """Concepts from a comma-separated string ('cat, sky') or a list, stripped, empty ones and repeats dropped."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    return list(dict.fromkeys(c.strip() for c in items if c and c.strip()))


@dataclass
class ConceptStreams:
    """The concept tokens' residual streams through one transformer call, and the maps they give."""

    names: list[str]
    initial: torch.Tensor  # (1, concepts, inner dim) after the context embedder
    blocks: list[torch.nn.Module]  # the double-stream blocks, in order
    first: int  # first block whose maps are averaged
    state: torch.Tensor | None = None
    temb: torch.Tensor | None = None
    _sum: torch.Tensor | None = None
    _n: int = 0
    steps: list[np.ndarray] = field(default_factory=list)  # per step: (concepts, h, w)

    def begin_call(self) -> None:
        """A captured transformer call starts: the concepts enter the first block as embedded."""
        self.state = self.initial

    def set_temb(self, temb: torch.Tensor) -> None:
        """The conditioning vector of the block about to run (its adaLN input)."""
        self.temb = temb[:1]

    def attend(
        self, block: int, attn: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Run the concepts through double block `block`; key/value (1, image, heads, d), out (image, heads * d)."""
        blk = self.blocks[block]
        c = self.state
        norm_c, gate_msa, shift_mlp, scale_mlp, gate_mlp = blk.norm1_context(c, emb=self.temb)
        qc = attn.norm_added_q(attn.add_q_proj(norm_c).unflatten(-1, (-1, attn.head_dim)))  # (1, C, heads, d)
        kc = attn.norm_added_k(attn.add_k_proj(norm_c).unflatten(-1, (-1, attn.head_dim)))
        vc = attn.add_v_proj(norm_c).unflatten(-1, (-1, attn.head_dim))
        keys = torch.cat([kc, key], dim=1).transpose(1, 2)  # (1, heads, C + image, d)
        values = torch.cat([vc, value], dim=1).transpose(1, 2)
        oc = F.scaled_dot_product_attention(qc.transpose(1, 2), keys, values).transpose(1, 2).flatten(2)  # (1, C, hd)
        if block >= self.first:
            scores = out.float() @ oc[0].float().T / math.sqrt(out.shape[-1])  # (image, C)
            maps = scores.softmax(dim=-1)
            self._sum = maps if self._sum is None else self._sum + maps
            self._n += 1
        c = c + gate_msa.unsqueeze(1) * attn.to_add_out(oc)
        norm = blk.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        self.state = c + gate_mlp.unsqueeze(1) * blk.ff_context(norm)

    def flush(self, grid: tuple[int, int]) -> None:
        """Close a step: the mean of its recorded blocks' maps, (concepts, h, w), to the host."""
        if self._sum is None:
            return
        self.steps.append((self._sum / self._n).T.reshape(len(self.names), *grid).float().cpu().numpy())
        self._sum, self._n = None, 0


@torch.no_grad()
def concept_streams(pipe: object, concepts: list[str]) -> ConceptStreams:
    """Embed the concepts with the pipeline's T5 and the transformer's context embedder (FLUX.1 only)."""
    transformer = pipe.transformer
    tok, enc = pipe.tokenizer_2, pipe.text_encoder_2
    batch = tok(concepts, padding="longest", return_tensors="pt")
    ids = batch.input_ids.to(enc.device)
    hidden = enc(ids)[0]  # (C, L, D)
    keep = (batch.attention_mask.to(enc.device) * (ids != tok.eos_token_id)).unsqueeze(-1).to(hidden.dtype)
    vectors = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)  # (C, D): mean over each concept's pieces
    initial = transformer.context_embedder(vectors[None].to(transformer.dtype))  # (1, C, inner)
    blocks = list(transformer.transformer_blocks)
    first = min(len(blocks) - 1, math.floor(FIRST_BLOCK_FRACTION * len(blocks)))
    return ConceptStreams(list(concepts), initial, blocks, first)
