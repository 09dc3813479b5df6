"""Attention capture: wrap each captured module's own processor (`pipeline.observe`) and hand
softmax(QK^T * scale) of the conditional image to a recorder; the layer output stays the processor's.

Only the captured modules are wrapped: every cross-attention `attn2`, and the self-attention
`attn1` layers whose grid is one of the stored self-attention grids. Everything else is untouched.
Per step, on the device: each level's (layer, head) cross-attention maps are averaged (the mid block
is a level of its own), and DAAM's map is built from the individual (layer, head) maps of the down
and up blocks (bicubic to the latent grid, clamped at 0, averaged); one copy to the host per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from pipeline.daam import daam_sum

# capture's callers import the grid helpers from here too: re-exported with `x as x`
from pipeline.grids import SELF_GRID_MAX_AREA as SELF_GRID_MAX_AREA
from pipeline.grids import STEP_GRID_MAX_AREA as STEP_GRID_MAX_AREA
from pipeline.grids import Grid, Level, attention_modules, level_of, pool_attention
from pipeline.grids import block_depth as block_depth
from pipeline.grids import grid_of as grid_of
from pipeline.grids import plan_grids as plan_grids
from pipeline.observe import CaptureAttnProcessor, CaptureError, wrap_processor
from pipeline.trace import StepRecord
from schema.maps import halve as halve

T = TypeVar("T")

PENDING_BYTES = 64 * 2**20  # queued layers are softmaxed once their scores would exceed this


@dataclass(frozen=True)
class CapturePlan:
    """What to capture for one generation: which tokens and which self-attention grids."""

    latent: Grid
    keep_tokens: tuple[int, ...]  # key positions whose cross-attention maps are kept
    self_grid: Grid  # step-aggregated self-attention grid
    step_grid: Grid  # per-step self-attention grid
    cfg: bool  # batch holds [unconditional, conditional] halves
    guidance: float = 1.0
    check_sums: bool = False  # track max |sum_k p - 1| of cross-attention rows (tests)
    image_index: int = 0  # which image of the batch's conditional half this recorder keeps (one run per image)


@dataclass
class AttentionRecorder:
    """Sink for the capture processors; owns all accumulation state for one generation."""

    plan: CapturePlan
    on_step: Callable[[int], None] | None = None
    steps: list[StepRecord] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)
    max_sum_error: float = 0.0
    _step: int = -1
    _timestep: float = 0.0
    _cross: dict[Level, torch.Tensor] = field(default_factory=dict)  # sum of (layer, head) maps
    _cross_n: dict[Level, int] = field(default_factory=dict)  # layers
    _cross_maps: dict[Level, int] = field(default_factory=dict)  # (layer, head) maps
    _daam: torch.Tensor | None = None  # sum of clamped, upsampled down/up (layer, head) maps
    _daam_n: int = 0
    _self_step: torch.Tensor | None = None
    _self_step_n: int = 0
    _self_layer: torch.Tensor | None = None  # this step's layers at the self grid (when coarser step grid)
    _self_layer_n: int = 0
    _self_agg: torch.Tensor | None = None
    _self_agg_steps: int = 0
    _sum_err: torch.Tensor | None = None
    _keep: torch.Tensor | None = None  # keep_tokens as an index on the device
    _pending: dict[tuple, list[tuple]] = field(default_factory=dict)  # layer group -> queued (q, k, mask)
    _pending_bytes: int = 0

    # -- called by the UNet hooks -------------------------------------------------------
    def begin_step(self, timestep: float) -> None:
        """A UNet forward starts: close the previous step and open the next."""
        self.flush()
        self._step += 1
        self._timestep = timestep

    def flush(self) -> None:
        """Average this step's layers and copy everything to the host in one transfer."""
        self._drain()
        if self._step < 0 or (not self._cross and self._self_step is None):
            return
        parts: list[torch.Tensor] = []
        shapes: list[tuple[Level | None, tuple[int, ...]]] = []
        for level, acc in self._cross.items():
            mean = acc / self._cross_maps[level]  # (tokens, queries)
            parts.append(mean.reshape(-1))
            shapes.append((level, (mean.shape[0], level[0], level[1])))
        if self._daam is not None:
            parts.append((self._daam / self._daam_n).reshape(-1))
            shapes.append((None, tuple(self._daam.shape)))
        self_mean = None
        if self._self_step is not None:
            self_mean = self._self_step / self._self_step_n  # (q, k) on the step grid
            parts.append(self_mean.reshape(-1))
            layer_mean = self_mean if self._self_layer is None else self._self_layer / self._self_layer_n
            self._self_agg = layer_mean.clone() if self._self_agg is None else self._self_agg + layer_mean
            self._self_agg_steps += 1
        host = torch.cat([p.float() for p in parts]).cpu().numpy()
        cross: dict[Level, np.ndarray] = {}
        daam = None
        offset = 0
        for level, shape in shapes:
            n = math.prod(shape)
            if level is None:
                daam = host[offset : offset + n].reshape(shape)
            else:
                cross[level] = host[offset : offset + n].reshape(shape)
            offset += n
        self_np = host[offset:].reshape(self_mean.shape) if self_mean is not None else None
        heads = {lv: self._cross_maps[lv] // self._cross_n[lv] for lv in self._cross}
        self.steps.append(
            StepRecord(self._step, self._timestep, cross, dict(self._cross_n), self_np, self._self_step_n, heads, daam)
        )
        self._cross, self._cross_n, self._cross_maps = {}, {}, {}
        self._daam, self._daam_n = None, 0
        self._self_step, self._self_step_n = None, 0
        self._self_layer, self._self_layer_n = None, 0
        if self._sum_err is not None:
            self.max_sum_error = max(self.max_sum_error, float(self._sum_err))
            self._sum_err = None
        if self.on_step is not None:
            self.on_step(self._step)

    def finish(self) -> None:
        """Flush the last step."""
        self.flush()

    def self_aggregate(self) -> np.ndarray | None:
        """Self-attention on the self grid, mean over steps (rows are distributions)."""
        if self._self_agg is None:
            return None
        return (self._self_agg / self._self_agg_steps).float().cpu().numpy()

    # -- called by the processors -------------------------------------------------------
    def observe(
        self,
        kind: str,
        level: Level,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> None:
        """Queue the conditional image's query/key of one layer at `level`; query/key are (batch, heads, L, d).

        Layers of the same kind and grid are softmaxed together in one batched call when the step
        closes (or when the queue reaches `PENDING_BYTES`): a small model has many small layers,
        and per-call dispatch, not arithmetic, is most of what capture would otherwise cost.
        """
        cond = (query.shape[0] // 2 if self.plan.cfg else 0) + self.plan.image_index
        q, k = query[cond], key[cond]
        m = None if mask is None else mask[cond]
        group = (kind, level, q.shape, k.shape, scale, m is not None)
        queue = self._pending.setdefault(group, [])
        queue.append((q, k, m))
        self._pending_bytes += 4 * q.shape[0] * q.shape[1] * k.shape[1]  # its float32 scores
        if self._pending_bytes > PENDING_BYTES:
            self._drain()

    def _drain(self) -> None:
        """Softmax every queued layer group in batched calls and add the head means to the step sums."""
        for (kind, level, q_shape, _k_shape, scale, masked), queue in self._pending.items():
            heads, queries = q_shape[0], q_shape[1]
            qs = torch.cat([q for q, _, _ in queue]).float()  # (layers*heads, queries, d)
            ks = torch.cat([k for _, k, _ in queue]).float()
            qs = qs * scale  # scaling the queries is cheaper than scaling the scores
            if masked:
                bias = torch.cat([m.expand(heads, queries, -1) for _, _, m in queue]).float()
                scores = torch.baddbmm(bias, qs, ks.transpose(-1, -2))
            else:
                scores = torch.bmm(qs, ks.transpose(-1, -2))
            probs = scores.softmax(dim=-1)  # (layers*heads, queries, keys)
            if kind == "cross" and self.plan.check_sums:
                err = (probs.sum(dim=-1) - 1).abs().max()
                self._sum_err = err if self._sum_err is None else torch.maximum(self._sum_err, err)
            if kind == "cross":
                self._add_cross(level, probs, len(queue), heads)
            else:
                self._add_self(level[:2], probs.sum(dim=0).div_(heads), len(queue))  # sum of layers' head means
        self._pending.clear()
        self._pending_bytes = 0

    def _add_cross(self, level: Level, probs: torch.Tensor, layers: int, heads: int) -> None:
        """Add `layers` layers' (layer*heads, queries, keys) probabilities to the level sum and the DAAM map."""
        if self._keep is None or self._keep.device != probs.device:
            self._keep = torch.tensor(self.plan.keep_tokens, device=probs.device)
        kept = probs.index_select(2, self._keep)  # (layers*heads, queries, tokens)
        summed = kept.sum(dim=0).T  # (tokens, queries)
        if level in self._cross:
            self._cross[level] += summed
            self._cross_n[level] += layers
            self._cross_maps[level] += layers * heads
        else:
            self._cross[level] = summed.contiguous()
            self._cross_n[level] = layers
            self._cross_maps[level] = layers * heads
        if len(level) > 2:  # DAAM leaves the mid block out
            return
        daam = daam_sum(kept, (level[0], level[1]), self.plan.latent)  # (tokens, H, W)
        if self._daam is None:
            self._daam = daam.clone()  # never a view of the level sums, which grow in place
        else:
            self._daam += daam
        self._daam_n += kept.shape[0]

    def _add_self(self, grid: Grid, summed: torch.Tensor, layers: int) -> None:
        """Add `layers` layers' head-mean self-attention (already summed) to this step's sums."""
        if grid == self.plan.self_grid and self.plan.self_grid != self.plan.step_grid:
            if self._self_layer is None:
                self._self_layer = summed  # a fresh tensor: the drain keeps no other reference
            else:
                self._self_layer += summed
            self._self_layer_n += layers
        pooled = pool_attention(summed, grid, self.plan.step_grid)
        if self._self_step is None:
            self._self_step = pooled
        else:
            self._self_step += pooled
        self._self_step_n += layers


def log_sigmas(scheduler: object) -> np.ndarray:
    """log sigma of every training timestep, sigma^2 = (1 - alpha_bar) / alpha_bar."""
    acp = scheduler.alphas_cumprod.double().numpy()  # (train_timesteps,)
    return 0.5 * np.log((1 - acp) / acp)


def _alpha_bar(table: np.ndarray, timestep: float) -> float:
    """Cumulative signal fraction at a (possibly fractional) timestep, interpolated in log-sigma."""
    ls = float(np.interp(timestep, np.arange(len(table)), table))
    return float(1.0 / (1.0 + math.exp(2 * ls)))


def _timestep_arg(args: tuple, kwargs: dict) -> float:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else 0)
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


class UnetCapture:
    """Observes one pipeline's UNet for the recorders of one pipeline call at a time (one recorder per image).

    Each captured module's processor is wrapped (`pipeline.observe`), never replaced, and a forward
    pre-hook / hook on the UNet opens each step and predicts its x0 preview. With `start`, the recorders
    are made at the first UNet forward of each call (when the latent grid and batch are known) and the
    wrappers installed then; `end()` closes the call and puts the original processors back.
    """

    def __init__(self, pipe: object, start: Callable[[torch.Tensor], list[AttentionRecorder]] | None = None) -> None:
        self.pipe = pipe
        self.unet = pipe.unet
        self.start = start
        self.recorders: list[AttentionRecorder] = []
        self._wrapped: dict[str, CaptureAttnProcessor] = {}
        self._originals: dict[str, object] = {}
        self._hooks: list = []
        self._sigmas: np.ndarray | None = None

    def attach(self) -> None:
        """Hook the UNet's forward."""
        self._hooks.append(self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        self._hooks.append(self.unet.register_forward_hook(self._post_hook, with_kwargs=True))

    def begin(self, recorders: list[AttentionRecorder]) -> None:
        """Wrap the processors of the modules the recorders' plan captures."""
        self.recorders = list(recorders)
        if not self.recorders:
            return
        self._sigmas = log_sigmas(self.pipe.scheduler)  # the scheduler may change between calls
        plan = self.recorders[0].plan
        n_down = len(self.unet.config.down_block_types)
        self_grids = {plan.self_grid, plan.step_grid}
        for name, module in attention_modules(self.unet).items():
            kind = "cross" if name.endswith("attn2") else "self"
            level = level_of(name, plan.latent, n_down)
            if kind == "self" and level[:2] not in self_grids:
                continue
            original = module.processor
            module.set_processor(wrap_processor(module, name, self._sink(kind, level, name)))
            self._originals[name] = original
            self._wrapped[name] = module.processor

    def _sink(self, kind: str, level: Level, name: str) -> Callable:
        queries = level[0] * level[1]

        def sink(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scale: float) -> None:
            if query.shape[2] != queries:
                raise CaptureError(f"attention module {name}: {query.shape[2]} queries, expected {queries}")
            for rec in self.recorders:
                rec.observe(kind, level, query, key, mask, scale)

        return sink

    def end(self, finish: bool = True) -> list[AttentionRecorder]:
        """Close the call: flush the recorders (unless abandoned), restore the processors; returns the recorders."""
        recorders, self.recorders = self.recorders, []
        try:
            if finish:
                for rec in recorders:
                    rec.finish()
        finally:
            modules = attention_modules(self.unet) if self._originals else {}
            for name, proc in self._originals.items():
                modules[name].set_processor(proc)
                self._wrapped[name].remove()
            self._originals, self._wrapped = {}, {}
        return recorders

    def around(self, call: Callable[[], T]) -> tuple[T, list[AttentionRecorder]]:
        """Run one pipeline call under the capture: (its result, the finished recorders); hooks removed after."""
        self.attach()
        try:
            result = call()
            return result, self.end()
        finally:
            self.detach()

    def detach(self) -> None:
        """Remove the UNet hooks and any wrappers still installed."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.end(finish=False)

    def _pre_hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.recorders and self.start is not None:
            self.begin(self.start(kwargs.get("sample", args[0] if args else None)))
        t = _timestep_arg(args, kwargs)
        for rec in self.recorders:
            rec.begin_step(t)

    def _post_hook(self, _module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self.recorders:
            return
        with torch.no_grad():
            sample = kwargs.get("sample", args[0] if args else None)
            out = output[0] if isinstance(output, tuple) else output.sample
            ab = _alpha_bar(self._sigmas, _timestep_arg(args, kwargs))
            for rec in self.recorders:
                plan, x, eps = rec.plan, sample, out
                if plan.cfg:
                    uncond, cond = out.chunk(2)
                    eps = uncond + plan.guidance * (cond - uncond)
                    x = sample.chunk(2)[1]
                x, eps = x[plan.image_index : plan.image_index + 1], eps[plan.image_index : plan.image_index + 1]
                prediction = self.pipe.scheduler.config.get("prediction_type", "epsilon")
                if prediction == "v_prediction":
                    x0 = math.sqrt(ab) * x - math.sqrt(1 - ab) * eps
                elif prediction == "sample":
                    x0 = eps
                else:
                    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
                rec.x0.append(x0.detach().clone())


@contextmanager
def attention_capture(pipe: object, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Wrap the captured modules' processors and hook `pipe.unet` for one recorder; restore everything on exit."""
    capture = UnetCapture(pipe)
    try:
        capture.begin([recorder])
        capture.attach()
        yield recorder
        capture.end()
    finally:
        capture.detach()
