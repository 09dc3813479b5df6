"""Heat-map math against hand-computed values and PyTorch's bicubic resampling."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from schema.maps import aggregate_levels, daam_threshold, normalize_for_display, upsample
from schema.stats import map_stats


def test_upsample_matches_torch_bicubic_clamped():
    rng = np.random.default_rng(0)
    x = rng.random((2, 8, 12)).astype(np.float32) - 0.2
    ref = F.interpolate(torch.tensor(x)[None], size=(32, 48), mode="bicubic", align_corners=False)[0].clamp(min=0)
    np.testing.assert_allclose(upsample(x, 32, 48), ref.numpy(), atol=1e-5)


def test_constant_maps_stay_constant_and_levels_average():
    a = np.full((4, 4), 0.2, dtype=np.float32)
    b = np.full((8, 8), 0.4, dtype=np.float32)
    out = aggregate_levels([a, b], 16, 16)
    np.testing.assert_allclose(out, 0.3, atol=1e-6)


def test_threshold_and_display_normalisation():
    m = np.array([[0.0, 0.1], [0.4, 1.0]], dtype=np.float32)
    assert daam_threshold(m).tolist() == [[False, False], [True, True]]
    np.testing.assert_allclose(normalize_for_display(m * 3), m)
    assert normalize_for_display(np.zeros((2, 2))).max() == 0


def test_map_stats_hand_computed():
    m = np.zeros((2, 2, 4))
    m[0, 0, 0] = 1.0  # all mass in the top-left cell of a 2x4 grid
    m[1] = 1.0  # uniform
    s = map_stats(m)
    assert s["mass"][0] == np.float32(1 / 8) and s["peak"][0] == 1
    assert s["centroid_x"][0] == np.float32(0.125) and s["centroid_y"][0] == np.float32(0.25)
    assert s["spread"][0] == 0 and abs(s["entropy"][0]) < 1e-7
    assert abs(s["entropy"][1] - 1) < 1e-6
    assert s["centroid_x"][1] == np.float32(0.5) and s["centroid_y"][1] == np.float32(0.5)
    # uniform on 2x4: var_x = mean((x-0.5)^2) over 0.125..0.875 = 0.078125; var_y in widths = 0.0625 * 0.5^2
    assert abs(s["spread"][1] - np.sqrt(0.078125 + 0.0625 * 0.25)) < 1e-6
