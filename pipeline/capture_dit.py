"""Attention capture for diffusion transformers (SD3 / SD3.5 `JointAttnProcessor2_0`, FLUX.1 `FluxAttnProcessor`).

Joint attention has one softmax over image and text keys together. The capture processors below copy the
installed processors op for op and keep their attention call (SDPA for SD3, `dispatch_attention_fn` for Flux),
so images are `torch.equal` to an untraced run; on the side, for the conditional sample's image queries:

    p(i -> t) = exp(q_i . k_t * scale - LSE_i),   LSE_i = log sum over ALL keys (image + text) of exp(q_i . k * scale)

computed one head and one block of query rows at a time (`ROW_CHUNK_BYTES`), so no (image x all-keys) matrix
of a whole layer is ever held. Stored per step and block band, averaged over the band's (layer, head) maps:
  - text maps renormalised over the text keys, p(i -> t) / sum_t' p(i -> t') (DAAM-comparable: each pixel's
    maps sum to 1 over the text positions), text positions folded into stored tokens (padding summed into one
    pseudo-token per encoder, so its mass is shown, not hidden);
  - the text share sum_t p(i -> t): how much each pixel listens to the prompt at all;
  - image->image attention renormalised over the image keys, pooled to the self grid (region tools).
Sequence order: SD3 [image, text]; Flux [text, image] (double- and single-stream blocks alike). With Flux's
true CFG the transformer runs twice per step; only the "cond" call is captured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.capture import SELF_GRID_MAX_AREA, STEP_GRID_MAX_AREA, pool_attention
from pipeline.concepts import ConceptStreams
from pipeline.dit_processors import CaptureFluxAttnProcessor, CaptureJointAttnProcessor
from pipeline.trace import StepRecord
from schema.maps import halve

ROW_CHUNK_BYTES = 32 * 2**20  # float32 scores of one head's query rows against all keys, at most this much

Grid = tuple[int, int]
BandKey = tuple  # (h, w, 'band', label, order): schema.maps.level_label gives the label


@dataclass(frozen=True)
class Band:
    """A contiguous run of blocks of one stream whose maps are averaged together (a DiT 'level')."""

    label: str  # 'joint-0-7', 'double-0-9', 'single-19-37'
    modules: tuple[str, ...]  # diffusers attention module names in the band


def _split(n: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Split blocks 0..n-1 at the given cumulative fractions into (first, last) spans, none empty when n allows."""
    cuts = [0] + [min(n, max(1, round(f * n))) for f in fractions] + [n]
    spans = [(a, b - 1) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    return spans or [(0, n - 1)]


def dit_bands(transformer: torch.nn.Module) -> list[Band]:
    """Block bands of an SD3 or Flux transformer, named by block ranges, with their attention modules.

    SD3/SD3.5: the joint blocks in thirds (24 blocks: 0-7 / 8-15 / 16-23). Flux: double-stream blocks split
    as 0-9 / 10-18 of 19, single-stream as 0-18 / 19-37 of 38; a tiny model's block counts scale the same.
    """
    names = [k.removesuffix(".processor") for k in transformer.attn_processors]
    bands: list[Band] = []

    def add(prefix: str, stream: str, n: int, fractions: Sequence[float]) -> None:
        for lo, hi in _split(n, fractions):
            mods = tuple(m for m in names if m.startswith(prefix) and lo <= int(m.split(".")[1]) <= hi)
            bands.append(Band(f"{stream}-{lo}-{hi}", mods))

    if is_flux(transformer):
        add("transformer_blocks.", "double", len(transformer.transformer_blocks), [10 / 19])
        add("single_transformer_blocks.", "single", len(transformer.single_transformer_blocks), [19 / 38])
    else:
        add("transformer_blocks.", "joint", len(transformer.transformer_blocks), [1 / 3, 2 / 3])
    return bands


def is_flux(transformer: torch.nn.Module) -> bool:
    """Whether a transformer is FLUX.1's (text first, RoPE, single-stream blocks)."""
    return hasattr(transformer, "single_transformer_blocks")


def self_grids(grid: Grid) -> tuple[Grid, Grid]:
    """(self grid, step grid) for an image-token grid: halved until they fit the UNet capture's area limits."""
    self_grid = grid
    while self_grid[0] * self_grid[1] > SELF_GRID_MAX_AREA:
        self_grid = halve(self_grid, 1)
    step_grid = self_grid
    while step_grid[0] * step_grid[1] > STEP_GRID_MAX_AREA:
        step_grid = halve(step_grid, 1)
    return self_grid, step_grid


def cell_matrix(src: Grid, dst: Grid) -> torch.Tensor:
    """(src cells, dst cells) 0/1 membership: each source cell in the destination cell its top-left corner falls in."""
    rows = (torch.arange(src[0]) * dst[0]) // src[0]
    cols = (torch.arange(src[1]) * dst[1]) // src[1]
    idx = (rows[:, None] * dst[1] + cols[None, :]).reshape(-1)
    return F.one_hot(idx, dst[0] * dst[1]).float()


def pool_last(x: torch.Tensor, src: Grid, dst: Grid, cells: torch.Tensor) -> torch.Tensor:
    """Sum the last axis of (..., src cells) over destination cells: (..., dst cells); reshapes for integer factors."""
    if src == dst:
        return x
    (sh, sw), (dh, dw) = src, dst
    if sh % dh == 0 and sw % dw == 0:
        return x.reshape(*x.shape[:-1], dh, sh // dh, dw, sw // dw).sum(dim=(-3, -1)).reshape(*x.shape[:-1], dh * dw)
    return x @ cells


@dataclass(frozen=True)
class DitPlan:
    """What to capture for one DiT generation."""

    grid: Grid  # image-token grid (latent / patch size)
    text_len: int  # text positions in the joint sequence
    fold: np.ndarray  # (text positions, stored tokens) 0/1: which positions each stored token sums
    bands: tuple[Band, ...]
    flux: bool  # [text, image] order, single-stream blocks; else SD3's [image, text]
    cfg_batched: bool  # SD3 with guidance: the batch is [uncond, cond]
    guidance: float = 1.0
    check_sums: bool = False  # track max |sum over all keys - 1| (tests)
    keep_raw: int = 0  # keep (q, k, scale, p_text) of this many first captured calls (tests)


def joint_text_probs(
    q: torch.Tensor, k: torch.Tensor, text: slice, image: slice, scale: float, chunk_bytes: int = ROW_CHUNK_BYTES
) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
    """Exact image->key probabilities of one layer, in blocks of heads and query rows of at most `chunk_bytes`.

    q: (heads, queries, d) image queries; k: (heads, keys, d) all keys, `text` and `image` their two parts.
    Yields (heads, rows, p_text, p_image) with p = exp(q.k * scale - LSE over all keys), i.e. the softmax over
    all keys (one fused kernel): p_text (h, rows, text keys), p_image (h, rows, image keys), both views. All
    heads go in one block when they fit (small layers: fewer calls), else one head and a block of rows.
    """
    heads, n_q, _ = q.shape
    n_k = k.shape[1]
    if heads * n_q * n_k * 4 <= chunk_bytes:
        blocks = [(slice(0, heads), slice(0, n_q))]
    else:
        rows_per = max(1, chunk_bytes // (4 * n_k))
        blocks = [
            (slice(h, h + 1), slice(r, min(n_q, r + rows_per))) for h in range(heads) for r in range(0, n_q, rows_per)
        ]
    for hs, rows in blocks:
        probs = torch.bmm(q[hs, rows].float() * scale, k[hs].float().transpose(-1, -2))  # (h, rows, keys)
        probs = probs.softmax(dim=-1)
        yield hs, rows, probs[..., text], probs[..., image]


@dataclass
class DitRecorder:
    """Sink of the DiT capture processors; owns all accumulation for one generation."""

    plan: DitPlan
    on_step: Callable[[int], None] | None = None
    concepts: ConceptStreams | None = None  # ConceptAttention (Flux, `--concepts`): maps in its own table
    steps: list[StepRecord] = field(default_factory=list)
    velocities: list[tuple[float, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (sigma, x_t, v)
    raw: list[tuple[str, torch.Tensor, torch.Tensor, float, torch.Tensor]] = field(default_factory=list)
    max_sum_error: float = 0.0
    active: bool = False
    _step: int = -1
    _timestep: float = 0.0
    _band_of: dict[str, BandKey] = field(default_factory=dict)
    _text: dict[BandKey, torch.Tensor] = field(default_factory=dict)  # (queries, stored) sums of (layer, head) maps
    _share: dict[BandKey, torch.Tensor] = field(default_factory=dict)  # (queries,) sums
    _layers: dict[BandKey, int] = field(default_factory=dict)
    _heads: dict[BandKey, int] = field(default_factory=dict)
    _self_sum: torch.Tensor | None = None  # this step's (self cells, self cells) sum of layer means
    _self_n: int = 0
    _self_agg: torch.Tensor | None = None
    _self_agg_steps: int = 0
    _fold: torch.Tensor | None = None
    _cells: torch.Tensor | None = None

    def __post_init__(self) -> None:
        h, w = self.plan.grid
        for order, band in enumerate(self.plan.bands):
            for m in band.modules:
                self._band_of[m] = (h, w, "band", band.label, order)
        self.self_grid, self.step_grid = self_grids(self.plan.grid)

    # -- called by the transformer hooks ----------------------------------------------------
    def begin_call(self, timestep: float, captured: bool) -> None:
        """A transformer call starts; a captured call (the conditional one) opens a new step."""
        self.active = captured
        if captured:
            self.flush()
            self._step += 1
            self._timestep = timestep
            if self.concepts is not None:
                self.concepts.begin_call()

    def flush(self) -> None:
        """Average this step's bands and copy them to the host in one transfer."""
        if self._step < 0 or not (self._text or self._self_n):
            return
        if self.concepts is not None:
            self.concepts.flush(self.plan.grid)
        keys = list(self._text)
        parts = []
        for key in keys:
            maps = self._heads[key] * self._layers[key]
            band = torch.cat([self._text[key], self._share[key][:, None]], dim=1) / maps  # (queries, stored + 1)
            parts.append(band.T.reshape(-1))
        if keys:
            total = sum(self._heads[k] * self._layers[k] for k in keys)
            daam = torch.cat([sum(self._text.values()), sum(self._share.values())[:, None]], dim=1) / total
            parts.append(daam.T.reshape(-1))
        self_step = None
        if self._self_n:
            layer_mean = self._self_sum / self._self_n  # (self cells, self cells)
            self._self_agg = layer_mean.clone() if self._self_agg is None else self._self_agg + layer_mean
            self._self_agg_steps += 1
            self_step = pool_attention(layer_mean, self.self_grid, self.step_grid)
            parts.append(self_step.reshape(-1))
        host = torch.cat([p.float() for p in parts]).cpu().numpy()
        h, w = self.plan.grid
        n_tok = self.plan.fold.shape[1] + 1
        size = n_tok * h * w
        cross = {k: host[i * size : (i + 1) * size].reshape(n_tok, h, w) for i, k in enumerate(keys)}
        daam = host[len(keys) * size : (len(keys) + 1) * size].reshape(n_tok, h, w) if keys else None
        self_np = host[(len(keys) + 1) * size :].reshape(self_step.shape) if self_step is not None else None
        layers, heads = dict(self._layers), dict(self._heads)
        self.steps.append(StepRecord(self._step, self._timestep, cross, layers, self_np, self._self_n, heads, daam))
        self._text, self._share, self._layers, self._heads = {}, {}, {}, {}
        self._self_sum, self._self_n = None, 0
        if self.on_step is not None:
            self.on_step(self._step)

    def finish(self) -> None:
        """Flush the last step."""
        self.flush()

    def self_aggregate(self) -> np.ndarray | None:
        """Image->image attention on the self grid, mean over steps (rows are distributions)."""
        if self._self_agg is None:
            return None
        return (self._self_agg / self._self_agg_steps).float().cpu().numpy()

    # -- called by the processors -------------------------------------------------------------
    def concept_attention(
        self, name: str, attn: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Carry the concepts through a Flux double block (captured calls only); see pipeline.concepts."""
        if self.active and self.concepts is not None:
            self.concepts.attend(int(name.split(".")[1]), attn, key, value, out)

    def observe(self, name: str, query: torch.Tensor, key: torch.Tensor, image: slice, text: slice | None) -> None:
        """One layer's conditional queries/keys, (heads, L, d); `image`/`text` locate the two parts of the sequence."""
        if not self.active:
            return
        band = self._band_of[name]
        q = query[:, image]  # (heads, image queries, d)
        scale = 1.0 / math.sqrt(q.shape[-1])  # SDPA's and dispatch_attention_fn's default scale
        if self._cells is None or self._cells.device != q.device:
            self._cells = cell_matrix(self.plan.grid, self.self_grid).to(q.device)  # (image, self cells)
            self._fold = torch.from_numpy(self.plan.fold).float().to(q.device)  # (text, stored)
        heads, n_img = q.shape[0], q.shape[1]
        text_sum = share_sum = None
        self_keys = torch.zeros(n_img, self._cells.shape[1], device=q.device)  # head sum, keys pooled
        raw = None
        err = 0.0
        if text is None:  # image-only attention (SD3.5's attn2)
            chunks = joint_text_probs(q, key, slice(0, 0), image, scale)
        else:
            chunks = joint_text_probs(q, key, text, image, scale)
        keep_raw = text is not None and len(self.raw) < self.plan.keep_raw
        for hs, rows, p_text, p_img in chunks:
            share = p_text.sum(dim=-1)  # (h, rows)
            img_mass = 1 - share  # the rest of each row: summing the wide image block again costs more than the QK^T
            if self.plan.check_sums:
                err = max(err, float((share + p_img.sum(dim=-1) - 1).abs().max()))
            if text is not None:
                if keep_raw:
                    if raw is None:
                        raw = torch.empty(heads, n_img, p_text.shape[-1], device=q.device)
                    raw[hs, rows] = p_text
                folded = ((p_text / share[..., None]) @ self._fold).sum(dim=0)  # (rows, stored), heads summed
                if text_sum is None:
                    text_sum = torch.zeros(n_img, folded.shape[1], device=q.device)
                    share_sum = torch.zeros(n_img, device=q.device)
                text_sum[rows] += folded
                share_sum[rows] += share.sum(dim=0)
            inv = img_mass.reciprocal_().unsqueeze(-1)  # (h, rows, 1)
            image_rows = p_img[0] * inv[0]  # (rows, image keys), renormalised over the image keys, heads summed
            for h in range(1, p_img.shape[0]):
                image_rows.addcmul_(p_img[h], inv[h])
            self_keys[rows] += pool_last(image_rows, self.plan.grid, self.self_grid, self._cells)
        self.max_sum_error = max(self.max_sum_error, err)
        if raw is not None:
            self.raw.append((name, q.detach().clone(), key.detach().clone(), scale, raw))
        if text_sum is not None:
            if band in self._text:
                self._text[band] += text_sum
                self._share[band] += share_sum
                self._layers[band] += 1
            else:
                self._text[band], self._share[band] = text_sum, share_sum
                self._layers[band], self._heads[band] = 1, heads
        counts = self._cells.sum(dim=0).clamp_(min=1)  # image tokens per self cell
        rows_sum = pool_last(self_keys.T, self.plan.grid, self.self_grid, self._cells).T  # (self cells, self cells)
        layer = rows_sum / counts[:, None] / heads  # query rows averaged per cell: rows sum to 1
        self._self_sum = layer if self._self_sum is None else self._self_sum + layer
        self._self_n += 1


def _call_timestep(args: tuple, kwargs: dict) -> torch.Tensor | None:
    t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
    return t if isinstance(t, torch.Tensor) else None


@contextmanager
def dit_capture(pipe: object, recorder: DitRecorder) -> Iterator[DitRecorder]:
    """Install the capture processors and call hooks on `pipe.transformer`; restore everything on exit.

    The transformer's `cache_context(name)` (Flux's true CFG) is observed to tell the "cond" call from the
    "uncond" one; SD3 batches CFG and never sets it. The velocity of every step (guided when CFG) is kept
    for the previews.
    """
    transformer = pipe.transformer
    plan = recorder.plan
    flux = plan.flux
    context = {"name": None}
    original_context = getattr(transformer, "cache_context", None)  # SD3's transformer has none

    @contextmanager
    def cache_context(name: str, **kwargs: object) -> Iterator[None]:
        context["name"] = name
        try:
            with original_context(name, **kwargs):
                yield
        finally:
            context["name"] = None

    pending: dict[str, object] = {}

    def pre_hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        t = _call_timestep(args, kwargs)
        value = float(t.flatten()[0]) if t is not None else 0.0
        sigma = value if flux else value / 1000.0  # Flux passes t / 1000, SD3 the scheduler's t
        captured = context["name"] in (None, "cond")
        recorder.begin_call(sigma * 1000.0, captured)
        pending["sigma"] = sigma
        pending["sample"] = kwargs.get("hidden_states", args[0] if args else None)

    def post_hook(_m: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        with torch.no_grad():
            out = output[0] if isinstance(output, tuple) else output.sample
            sample = pending["sample"]
            if plan.cfg_batched:
                uncond, cond = out.chunk(2)
                out = uncond + plan.guidance * (cond - uncond)
                sample = sample.chunk(2)[1]
            if context["name"] == "uncond" and recorder.velocities:
                sigma, x, v_cond = recorder.velocities[-1]
                recorder.velocities[-1] = (sigma, x, out[:1] + plan.guidance * (v_cond - out[:1]))
            else:
                recorder.velocities.append((float(pending["sigma"]), sample[:1].detach().clone(), out[:1].clone()))

    originals: dict[str, object] = {}
    modules = {
        k.removesuffix(".processor"): transformer.get_submodule(k.removesuffix(".processor"))
        for k in transformer.attn_processors
    }
    hooks = []
    try:
        for name, module in modules.items():
            originals[name] = module.processor
            proc = (
                CaptureFluxAttnProcessor(recorder, name, module.processor)
                if flux
                else CaptureJointAttnProcessor(recorder, name)
            )
            module.set_processor(proc)
        if original_context is not None:
            transformer.cache_context = cache_context
        hooks.append(transformer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        hooks.append(transformer.register_forward_hook(post_hook, with_kwargs=True))
        if recorder.concepts is not None:
            streams = recorder.concepts

            def block_hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                streams.set_temb(kwargs.get("temb", args[2] if len(args) > 2 else None))

            hooks += [b.register_forward_pre_hook(block_hook, with_kwargs=True) for b in streams.blocks]
        yield recorder
        recorder.finish()
    finally:
        for h in hooks:
            h.remove()
        if "cache_context" in vars(transformer):
            del transformer.cache_context
        for name, proc in originals.items():
            modules[name].set_processor(proc)
