"""Where a UNet's attention layers sit: each module's level (grid, mid block apart), the levels a
generation captures, the self-attention grids it stores, and pooling a self-attention matrix between grids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from schema.maps import halve, level_order

SELF_GRID_MAX_AREA = 1536  # 32x32 for square 512 px SD 1.5, 32x48 for 512x768.
STEP_GRID_MAX_AREA = 384  # 16x16 per step for square SD 1.5, 16x24 for 512x768.

Grid = tuple[int, int]
Level = tuple  # (h, w) for down/up-block layers, (h, w, 'mid') for the mid block (schema.maps.level_label)


def grid_of(queries: int, latent: Grid) -> Grid:
    """The spatial grid of a layer from its query count, by halving the latent grid."""
    for times in range(12):
        g = halve(latent, times)
        if g[0] * g[1] == queries:
            return g
    raise ValueError(f"{queries} queries match no downsampling of the {latent} latent grid")


def level_of(module_name: str, latent: Grid, n_down: int) -> Level:
    """The level key of an attention module: its grid, tagged 'mid' for the UNet mid block."""
    grid = halve(latent, block_depth(module_name, n_down))
    return (*grid, "mid") if module_name.startswith("mid_block") else grid


def block_depth(module_name: str, n_down: int) -> int:
    """How many times the UNet has downsampled at an attention module, from its diffusers name."""
    parts = module_name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "up_blocks":
        return n_down - 1 - int(parts[1])
    if parts[0] == "mid_block":
        return n_down - 1
    raise ValueError(f"unexpected attention module {module_name}")


def attention_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """diffusers Attention modules of a UNet by name (processor key without '.processor')."""
    return {
        key.removesuffix(".processor"): unet.get_submodule(key.removesuffix(".processor"))
        for key in unet.attn_processors
    }


def plan_grids(unet: torch.nn.Module, latent: Grid) -> tuple[Grid, Grid, list[Level]]:
    """(self grid, step grid, cross-attention levels finest first) for a UNet at a latent size."""
    n_down = len(unet.config.down_block_types)
    names = attention_modules(unet)
    levels = sorted({level_of(n, latent, n_down) for n in names if n.endswith("attn2")}, key=level_order)
    grids = sorted({halve(latent, block_depth(n, n_down)) for n in names}, key=lambda g: -g[0] * g[1])
    fitting = [g for g in grids if g[0] * g[1] <= SELF_GRID_MAX_AREA]
    self_grid = fitting[0] if fitting else grids[-1]
    step_grid = self_grid
    while step_grid[0] * step_grid[1] > STEP_GRID_MAX_AREA:
        step_grid = halve(step_grid, 1)
    return self_grid, step_grid, levels


def pool_attention(probs: torch.Tensor, src: Grid, dst: Grid) -> torch.Tensor:
    """Downsample a (queries, keys) self-attention matrix on grid `src` to grid `dst`.

    Query rows are averaged over each destination cell and key probabilities summed over it, so
    each row stays a probability distribution. Integer factors use reshapes (fast); other ratios
    fall back to adaptive average pooling with rows renormalised.
    """
    if src == dst:
        return probs
    (sh, sw), (dh, dw) = src, dst
    if sh % dh == 0 and sw % dw == 0:
        fh, fw = sh // dh, sw // dw
        k = sh * sw
        rows = probs.reshape(dh, fh, dw, fw, k).mean(dim=(1, 3)).reshape(dh * dw, k)  # (q', keys)
        return rows.reshape(dh * dw, dh, fh, dw, fw).sum(dim=(2, 4)).reshape(dh * dw, dh * dw)  # (q', k')
    q = probs.reshape(sh, sw, sh * sw).permute(2, 0, 1)  # (keys, qh, qw)
    q = F.adaptive_avg_pool2d(q, dst).reshape(sh * sw, dh * dw).T  # (q', keys)
    k = F.adaptive_avg_pool2d(q.reshape(-1, sh, sw), dst).reshape(dh * dw, -1)
    return k / k.sum(dim=-1, keepdim=True)  # (q', k')
