"""Heat-map math against hand-computed values and PyTorch's bicubic resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from schema.codec import MAP_CODE_MAX, decode_maps, decode_rows, encode_maps, encode_rows
from schema.maps import (
    AGGREGATIONS,
    aggregate_levels,
    check_aggregation,
    combine_levels,
    daam_threshold,
    halve,
    is_mid,
    level_label,
    level_order,
    level_weights,
    normalize_for_display,
    upsample,
)
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


def test_upsample_unclamped_matches_torch_bicubic_both_ways():
    rng = np.random.default_rng(1)
    x = rng.random((3, 5, 7)).astype(np.float32)
    for size in [(16, 16), (20, 9), (4, 3)]:  # up, mixed, down
        ref = F.interpolate(torch.tensor(x)[None], size=size, mode="bicubic", align_corners=False)[0]
        np.testing.assert_allclose(upsample(x, *size, clamp=False), ref.numpy(), atol=1e-5)
    assert (upsample(x, 16, 16, clamp=False) < 0).any()  # bicubic undershoots: the clamp is a choice
    np.testing.assert_array_equal(upsample(x, 5, 7, clamp=False), x)


def test_level_labels_order_and_grids():
    assert halve((64, 96), 3) == (8, 12) and halve((9, 9), 1) == (5, 5)
    keys = [(8, 8, "mid"), (16, 16), (8, 8), (32, 32)]
    assert [level_label(k) for k in sorted(keys, key=level_order)] == ["32x32", "16x16", "8x8", "mid-8x8"]
    assert is_mid("mid-4x4") and not is_mid("4x4")


def test_daam_weights_levels_by_layers_times_heads_without_mid_block():
    counts = {"16x16": 3 * 4, "8x8": 3 * 4, "mid-4x4": 1 * 4}
    maps = {
        "16x16": np.full((16, 16), 0.1, np.float32),
        "8x8": np.full((8, 8), 0.3, np.float32),
        "mid-4x4": np.full((4, 4), 0.9, np.float32),
    }
    np.testing.assert_allclose(combine_levels(maps, level_weights("daam", counts), 16, 16), 0.2, atol=1e-6)
    with_mid = (12 * 0.1 + 12 * 0.3 + 4 * 0.9) / 28
    np.testing.assert_allclose(
        combine_levels(maps, level_weights("daam_with_mid", counts), 16, 16), with_mid, atol=1e-6
    )
    np.testing.assert_allclose(combine_levels(maps, level_weights("equal_levels", counts), 16, 16), 13 / 30, atol=1e-6)
    only = level_weights("levels", counts, ["8x8"])
    np.testing.assert_allclose(combine_levels(maps, only, 16, 16), 0.3, atol=1e-6)
    with pytest.raises(ValueError, match="no level 2x2"):
        level_weights("levels", counts, ["2x2"])


def test_combined_map_is_clamped_after_averaging_not_per_level():
    spike = np.zeros((4, 4), np.float32)
    spike[1, 1] = 1.0  # its bicubic upsampling undershoots around the peak
    flat = np.full((16, 16), 0.05, np.float32)
    got = combine_levels({"4x4": spike, "16x16": flat}, {"4x4": 1.0, "16x16": 1.0}, 16, 16)
    expected = np.maximum((upsample(spike, 16, 16, clamp=False) + flat) / 2, 0)
    np.testing.assert_allclose(got, expected, atol=1e-7)
    assert not np.allclose(got, (upsample(spike, 16, 16) + flat) / 2)


def test_aggregations_are_named_and_only_daam_is_daam():
    assert [a.name for a in AGGREGATIONS.values() if a.daam] == ["daam"]
    assert all("not DAAM" in a.label for a in AGGREGATIONS.values() if not a.daam)
    with pytest.raises(ValueError, match="choose from daam"):
        check_aggregation("mean", None)
    with pytest.raises(ValueError, match="needs the levels"):
        check_aggregation("levels", None)
    with pytest.raises(ValueError, match="aggregation='levels'"):
        check_aggregation("daam", ["16x16"])


def test_row_codec_round_trip_within_half_a_step_of_the_row_max():
    rng = np.random.default_rng(2)
    m = rng.dirichlet(np.ones(64), size=64).astype(np.float32)  # rows are distributions
    m[3] = 0  # an empty row stays empty
    m[5, 0] = -0.01  # negatives are clamped
    scale, data = encode_rows(m)
    assert len(data) == 64 * 64 and scale.dtype == np.float32
    back = decode_rows(scale, memoryview(data), (64, 64))
    assert back.dtype == np.float32 and not back[3].any() and back[5, 0] == 0
    err = np.abs(back - np.maximum(m, 0)).max(axis=1)
    assert (err <= scale / 510 + 1e-9).all()
    np.testing.assert_array_equal(back.max(axis=1), np.maximum(m, 0).max(axis=1))


def test_map_codec_round_trip_within_half_a_code_of_the_map_max():
    """DAAM maps as uint16 codes with a per-map scale: error <= 0.5/65535 of the map's max (plus float32 rounding),
    the peak and zeros exact, an all-zero map all zero, negatives clamped, a map with NaN or inf all NaN."""
    rng = np.random.default_rng(3)
    maps = (rng.random((6, 64 * 64)) ** 6 * rng.uniform(1e-6, 50, (6, 1))).astype(np.float32)  # peaked, any scale
    maps[1] = 0  # an all-zero map
    maps[2, :100] = 0  # zeros inside a map
    maps[3, 7] = -0.02  # bicubic undershoot that DAAM clamps
    maps[4, 9] = np.nan
    maps[5, 11] = np.inf
    scales, codes = encode_maps(maps)
    assert scales.dtype == np.float32 and codes.dtype == np.uint16 and codes.shape == maps.shape
    back = decode_maps(scales, codes)
    assert back.dtype == np.float32 and back.shape == maps.shape
    exact = np.maximum(maps[:4], 0)
    peak = exact.max(axis=1)
    err = np.abs(back[:4] - exact).max(axis=1)
    assert (err <= peak * (0.5 / MAP_CODE_MAX + 2**-23)).all(), err / np.maximum(peak, 1e-30) * MAP_CODE_MAX
    assert err[0] > peak[0] * 0.4 / MAP_CODE_MAX  # the bound is tight: it is the codes, not an exact copy
    np.testing.assert_array_equal(back[:4].max(axis=1), peak)  # the peak is the scale, exactly
    assert scales[1] == 0 and not codes[1].any() and not back[1].any()
    assert not back[2, :100].any() and back[3, 7] == 0
    assert np.isnan(scales[4:]).all() and np.isnan(back[4:]).all() and not codes[4:].any()
    np.testing.assert_array_equal(encode_maps(back[:4])[1], codes[:4])  # re-encoding stored maps changes nothing
    with pytest.raises(ValueError, match="pixels"):
        encode_maps(maps[0])
