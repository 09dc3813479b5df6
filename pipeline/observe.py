"""Observe a diffusers attention module without replacing what it computes.

`CaptureAttnProcessor` wraps the processor a module already has (diffusers' default, a LoRA'd module's,
IP-Adapter's, fused projections, a user's own) and delegates the layer output to it unchanged, so images
stay bit for bit those of an untraced call. Forward hooks on the module's projections (`to_q`/`to_k`, the
fused `to_qkv`/`to_kv`, and `norm_q`/`norm_k` when the module normalises them) see the very queries and keys
the processor computes; the sink gets them as (batch, heads, L, d) after the call. A processor that does
not compute them through those projections exactly once can't be observed safely: `CaptureError` names the
module and the processor class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

# Processors whose keys mix the image's own states into cross-attention (added KV projections): the keys
# seen at `to_k` are not the keys the probabilities are taken over.
UNOBSERVABLE_MARKERS = ("AddedKV",)
ROLES = ("to_q", "to_k", "to_qkv", "to_kv", "norm_q", "norm_k")

Sink = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], None]


class CaptureError(RuntimeError):
    """An attention module whose processor can't be observed safely (names the module and processor class)."""


def check_observable(name: str, attn: torch.nn.Module) -> None:
    """Raise CaptureError when a module's installed processor can't be observed safely."""
    proc = type(attn.processor).__name__
    if any(m in proc for m in UNOBSERVABLE_MARKERS) or getattr(attn, "added_kv_proj_dim", None) is not None:
        raise CaptureError(
            f"can't observe attention module {name}: its processor {proc} adds key/value projections, so its "
            "attention probabilities are not those of the module's to_q/to_k"
        )


class CaptureAttnProcessor:
    """Delegates a module's output to its original processor; hands the observed queries/keys to a sink."""

    def __init__(self, inner: object, attn: torch.nn.Module, name: str, sink: Sink) -> None:
        self.inner = inner  # the processor the module had: it computes the output
        self.name = name  # diffusers' module name, for errors
        self.sink = sink  # called with (query, key, mask, scale) after each call
        self._seen: dict[str, list[torch.Tensor]] = {}
        self._armed = False
        self._hooks = []
        for role in ROLES:
            module = getattr(attn, role, None)
            if isinstance(module, torch.nn.Module):
                self._hooks.append(module.register_forward_hook(self._hook(role)))

    def _hook(self, role: str) -> Callable:
        def hook(_module: torch.nn.Module, _args: tuple, output: torch.Tensor) -> None:
            if self._armed:
                self._seen.setdefault(role, []).append(output)

        return hook

    def remove(self) -> None:
        """Remove the projection hooks (the module gets its original processor back separately)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: object = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        self._seen = {}
        self._armed = True
        try:
            out = self.inner(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        finally:
            self._armed = False
        query, key = self._query_key(attn)
        self._seen = {}
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if isinstance(context, tuple | list):  # IP-Adapter: (text states, image-prompt states)
            context = context[0]
        mask = None
        if attention_mask is not None:  # as AttnProcessor2_0 prepares it
            batch, length = context.shape[0], context.shape[-2]
            mask = attn.prepare_attention_mask(attention_mask, length, batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        with torch.no_grad():
            self.sink(query, key, mask, attn.scale)
        return out

    def _one(self, role: str) -> torch.Tensor | None:
        seen = self._seen.get(role, [])
        if len(seen) > 1:
            raise CaptureError(
                f"can't observe attention module {self.name}: its processor {type(self.inner).__name__} "
                f"called {role} {len(seen)} times in one call"
            )
        return seen[0] if seen else None

    def _query_key(self, attn: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's (batch, heads, L, d) queries and keys, as the processor computed them."""
        heads = attn.heads
        qkv, kv = self._one("to_qkv"), self._one("to_kv")
        query = self._one("norm_q")
        if query is None:
            q = self._one("to_q")
            if q is None and qkv is not None:
                q = qkv.chunk(3, dim=-1)[0]
            query = _heads(q, heads)
        key = self._one("norm_k")
        if key is None:
            k = self._one("to_k")
            if k is None and kv is not None:
                k = kv.chunk(2, dim=-1)[0]
            elif k is None and qkv is not None:
                k = qkv.chunk(3, dim=-1)[1]
            key = _heads(k, heads)
        if query is None or key is None or query.ndim != 4 or key.ndim != 4:
            raise CaptureError(
                f"can't observe attention module {self.name}: its processor {type(self.inner).__name__} does not "
                "compute queries and keys through the module's to_q/to_k (or fused to_qkv/to_kv) projections"
            )
        return query, key


def _heads(t: torch.Tensor | None, heads: int) -> torch.Tensor | None:
    """(batch, L, heads*d) -> (batch, heads, L, d)."""
    if t is None or t.ndim != 3:
        return None
    b, length, inner = t.shape
    return t.view(b, length, heads, inner // heads).transpose(1, 2)  # (b, heads, L, d)


_CLASSES: dict[tuple, type] = {}


def wrap_processor(attn: torch.nn.Module, name: str, sink: Sink) -> CaptureAttnProcessor:
    """A capture processor around `attn`'s installed one, whose `__call__` declares the same parameters.

    diffusers' `Attention.forward` passes a `cross_attention_kwargs` entry only when the processor's
    `__call__` names it: the wrapper's signature is the wrapped processor's, so those entries still arrive.
    """
    check_observable(name, attn)
    inner = attn.processor
    inner_sig = inspect.signature(inner.__call__)
    key = (type(inner), str(inner_sig))
    if key not in _CLASSES:
        self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

        def __call__(self: CaptureAttnProcessor, *args: object, **kwargs: object) -> torch.Tensor:
            return CaptureAttnProcessor.__call__(self, *args, **kwargs)

        __call__.__signature__ = inner_sig.replace(parameters=[self_param, *inner_sig.parameters.values()])
        _CLASSES[key] = type("CaptureAttnProcessor", (CaptureAttnProcessor,), {"__call__": __call__})
    return _CLASSES[key](inner, attn, name, sink)
