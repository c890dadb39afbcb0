"""Drawing functions of focus_detr_jax/visualize.py (pure numpy/PIL, no model)."""

import numpy as np
import pytest

from focus_detr_jax import visualize
from focus_detr_jax.models.focus_detr import feature_level_shapes


def test_heatmap_has_image_size_and_follows_the_scores():
  image = np.full((40, 60, 3), 128, np.uint8)
  scores = np.zeros((5, 8), np.float32)          # stride 8 over a 40x60 input (last column partly)
  scores[1, 2] = 1.0
  scores[3, 5] = 0.5
  out = visualize.fg_heatmap(image, scores, image_size=(40, 60), stride=8)
  assert out.shape == image.shape and out.dtype == np.uint8
  hot, mid, cold = out[8:16, 16:24], out[24:32, 40:48], out[0:8, 0:8]
  for block in (hot, mid, cold):   # constant inside one token
    assert (block == block[0, 0]).all()
  assert not np.array_equal(hot[0, 0], mid[0, 0])
  assert not np.array_equal(hot[0, 0], cold[0, 0])
  assert not np.array_equal(mid[0, 0], cold[0, 0])
  # Equal scores give equal pixels; every other cold token looks like `cold`.
  np.testing.assert_array_equal(out[32:40, 56:60], np.broadcast_to(cold[0, 0], (8, 4, 3)))
  # A display of another resolution maps onto the same tokens.
  big = visualize.fg_heatmap(np.full((80, 120, 3), 128, np.uint8), scores, (40, 60), 8)
  assert big.shape == (80, 120, 3)
  np.testing.assert_array_equal(big[16:32, 32:48], np.broadcast_to(hot[0, 0], (16, 16, 3)))


def test_drawing_a_box_changes_exactly_its_outline():
  image = np.zeros((60, 80, 3), np.uint8)
  out = visualize.draw_detections(image, [[10.0, 20.0, 50.0, 40.0], [0, 0, 30, 30]], [0.9, 0.1],
                                  [1, 2], ["a", "b", "c"], score_threshold=0.5, line_width=2,
                                  label_text=False)
  ring = np.zeros((60, 80), bool)
  ring[20:40, 10:50] = True
  ring[22:38, 12:48] = False
  changed = np.any(out != image, axis=-1)
  np.testing.assert_array_equal(changed, ring)     # the low-score box is not drawn
  assert (out[ring] == visualize.label_color(1)).all()
  assert (image == 0).all()                        # the input is not modified
  # With the label, pixels outside the box change only in the label strip above it.
  labelled = visualize.draw_detections(image, [[10.0, 20.0, 50.0, 40.0]], [0.9], [1], ["a", "b"],
                                       score_threshold=0.5, line_width=2)
  changed = np.any(labelled != image, axis=-1)
  assert changed[ring].all()
  outside = changed & ~ring
  assert outside.any() and np.nonzero(outside)[0].max() < 20


def test_token_dots_and_grid():
  canvas = (64, 96)
  level_shapes = feature_level_shapes(*canvas)
  n = sum(h * w for h, w in level_shapes)
  mask = np.zeros(n, bool)
  mask[level_shapes[0][1] * 2 + 3] = True          # level 0, row 2, column 3 -> centre (28, 20)
  image = np.full((64, 96, 3), 200, np.uint8)
  dots = visualize.token_dots(image, mask, level_shapes, image_size=canvas)
  assert dots.shape == image.shape
  assert tuple(dots[20, 28]) == visualize.LEVEL_COLORS[0]
  bright = np.all(dots == visualize.LEVEL_COLORS[0], axis=-1)
  ys, xs = np.nonzero(bright)
  assert abs(ys.mean() - 20) < 1 and abs(xs.mean() - 28) < 1 and np.ptp(ys) <= 6

  rng = np.random.default_rng(0)
  intermediates = dict(fg_score=rng.normal(size=n), token_valid=np.ones(n, bool),
                       updated=rng.random((3, n)) < 0.5, objects=rng.random((3, n)) < 0.1)
  grid = visualize.token_selection_panels(image, intermediates, level_shapes, canvas,
                                          panel_size=120)
  # 3 rows (heatmaps, updated, objects) x max(1 + 4 levels, 3 layers) columns of 80x120 panels.
  # ... and the legend strip (heatmap scale, dot colour per level) below them.
  assert grid.shape == (3 * (80 + visualize._TITLE_HEIGHT) + visualize.LEGEND_HEIGHT, 5 * 120, 3)
  assert grid.dtype == np.uint8


def test_denormalize_inverts_the_pipeline_normalisation():
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  u8 = np.random.default_rng(1).integers(0, 256, (5, 7, 3)).astype(np.uint8)
  x = (u8.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  padded = np.concatenate([x, np.zeros((2, 7, 3), np.float32)])
  out = visualize.denormalize(padded, mean, std)
  np.testing.assert_array_equal(out[:5], u8)
  assert (out[5:] == 0).all()


def test_bad_level_shapes_are_refused():
  with pytest.raises(ValueError, match="level shapes"):
    visualize.split_levels(np.zeros(10), ((2, 2), (1, 1)))
