"""Capture processors for joint attention: diffusers' `JointAttnProcessor2_0` (SD3, SD3.5) and `FluxAttnProcessor`
(FLUX.1) copied op for op, with the same attention call, so a traced image is `torch.equal` to an untraced one;
each hands the conditional sample's queries and keys to its observer (`pipeline.capture_dit.DitRecorder`).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class Observer(Protocol):
    """The recorder side of a capture processor."""

    plan: object  # .cfg_batched (SD3's [uncond, cond] batch), .text_len (Flux's text positions)

    def observe(self, name: str, query: torch.Tensor, key: torch.Tensor, image: slice, text: slice | None) -> None:
        """One layer's conditional (heads, L, d) queries and keys; where image and text sit in the sequence."""

    def concept_attention(
        self, name: str, attn: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor
    ) -> None:
        """A Flux double block's image keys/values (1, image, heads, d) and attention output, for the concepts."""


class CaptureJointAttnProcessor:
    """diffusers' `JointAttnProcessor2_0` (SD3, SD3.5), op for op, plus the capture. Order: [image, text]."""

    def __init__(self, recorder: Observer, name: str) -> None:
        self.recorder = recorder
        self.name = name

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.FloatTensor,
        encoder_hidden_states: torch.FloatTensor = None,
        attention_mask: torch.FloatTensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.FloatTensor:
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, image, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            eq = attn.add_q_proj(encoder_hidden_states)
            ek = attn.add_k_proj(encoder_hidden_states)
            ev = attn.add_v_proj(encoder_hidden_states)
            eq = eq.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, text, d)
            ek = ek.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ev = ev.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([query, eq], dim=2)  # (b, heads, image + text, d)
            key = torch.cat([key, ek], dim=2)
            value = torch.cat([value, ev], dim=2)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        with torch.no_grad():
            n_img = residual.shape[1]
            cond = batch_size - 1 if self.recorder.plan.cfg_batched else 0  # [uncond, cond]: the last sample
            text = slice(n_img, None) if encoder_hidden_states is not None else None
            self.recorder.observe(self.name, query[cond], key[cond], slice(0, n_img), text)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class CaptureFluxAttnProcessor:
    """diffusers' `FluxAttnProcessor`, op for op (same `dispatch_attention_fn` call), plus the capture.

    Order [text, image]; single-stream blocks get text and image already concatenated and no
    `encoder_hidden_states`, so the text length comes from the plan.
    """

    def __init__(self, recorder: Observer, name: str, original: object) -> None:
        self.recorder = recorder
        self.name = name
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))  # (b, L, heads, d)
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)  # (b, text + image, heads, d)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        with torch.no_grad():
            n_txt = self.recorder.plan.text_len
            q, k = query[0].transpose(0, 1), key[0].transpose(0, 1)  # (heads, L, d); true CFG calls are separate
            self.recorder.observe(self.name, q, k, slice(n_txt, None), slice(0, n_txt))
            if encoder_hidden_states is not None:  # a double-stream block: ConceptAttention rides its text path
                out = hidden_states[0, n_txt:].flatten(-2)  # (image, heads * d), before the output projection
                self.recorder.concept_attention(self.name, attn, key[:1, n_txt:], value[:1, n_txt:], out)

        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states
