"""Foreground labels and select_loss (focus_detr_jax/train/foreground.py)."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focus_detr_jax.parity import loss_stages
from focus_detr_jax.train import foreground

from conftest import default_r50_dir  # noqa: E402

# shared/parity/public when present, else the in-repo compact R50 set (conftest).
PARITY_DIR = Path(os.environ.get("FOCUS_DETR_PARITY_DIR", default_r50_dir()))

needs_parity = pytest.mark.skipif(not (PARITY_DIR / "foreground_labels.npz").exists(),
                                  reason="parity reference data absent")


@needs_parity
def test_labels_and_select_loss_match_reference():
  rows = loss_stages.compare_foreground_labels(PARITY_DIR, max_boxes=8)
  assert len(rows) == 2
  for row in rows:
    assert row.passed, row


def _labels(boxes_xyxy_abs, valid, image_hw, level_shapes):
  """Labels for absolute xyxy boxes of one image (converted to the normalised cxcywh input)."""
  h, w = image_hw
  xyxy = np.asarray(boxes_xyxy_abs, np.float32) / np.array([w, h, w, h], np.float32)
  cxcywh = np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
  return np.asarray(_jit_labels(
      cxcywh[None], np.asarray(valid)[None], np.array([[h, w]], np.int32), level_shapes))[0]


_jit_labels = jax.jit(foreground.foreground_labels, static_argnums=(3,))
LEVELS = ((8, 8), (4, 4), (2, 2), (1, 1))  # a 64x64 canvas


def test_level_ranges_and_strict_inside():
  # A 40x40 box: max distance from an inside token is < 40 <= 64, so only level 0 is positive.
  labels = _labels([[8, 8, 48, 48]], [True], (64, 64), LEVELS)
  level0 = labels[:64].reshape(8, 8)
  assert labels[64:].sum() == 0
  # Token centres are 8j + 4: strictly inside (8, 48) means j in 1..5.
  expected = np.zeros((8, 8), int)
  expected[1:6, 1:6] = 1
  np.testing.assert_array_equal(level0, expected)
  # Centres exactly on the border (x = 12) are not inside.
  border = _labels([[12, 12, 44, 44]], [True], (64, 64), LEVELS)[:64].reshape(8, 8)
  assert border[1].sum() == 0 and border[:, 1].sum() == 0 and border[2, 2] == 1


def test_large_box_goes_to_coarse_levels():
  # A 200 px box: the largest centre-to-side distance of an inside token is between 100 (at the
  # centre) and 200, so tokens land on level 1 (64, 128] and level 2 (128, 256] only.
  labels = _labels([[0, 0, 200, 200]], [True], (200, 200), ((25, 25), (13, 13), (7, 7), (4, 4)))
  sizes = [25 * 25, 13 * 13, 7 * 7, 4 * 4]
  per_level = np.split(labels, np.cumsum(sizes)[:-1])
  assert [int(level.sum() > 0) for level in per_level] == [0, 1, 1, 0]


def test_padded_boxes_never_match():
  big = [[0, 0, 64, 64]]
  with_padding = _labels(big + big, [False, False], (64, 64), LEVELS)
  assert with_padding.sum() == 0
  real = _labels([[8, 8, 48, 48]] + big, [True, False], (64, 64), LEVELS)
  np.testing.assert_array_equal(real, _labels([[8, 8, 48, 48]], [True], (64, 64), LEVELS))


def test_select_loss_matches_naive_form_and_is_stable():
  key = jax.random.PRNGKey(0)
  logits = 3.0 * jax.random.normal(key, (2, 50))
  labels = (jax.random.uniform(jax.random.PRNGKey(1), (2, 50)) < 0.3).astype(jnp.int32)
  p = jax.nn.sigmoid(logits)
  y = labels.astype(jnp.float32)
  pt = p * y + (1 - p) * (1 - y)
  w = 0.25 * y + 0.75 * (1 - y)
  naive = (-w * (1 - pt) ** 2 * jnp.log(pt)).sum(1) / jnp.maximum(labels.sum(1), 1)
  np.testing.assert_allclose(foreground.select_loss_per_image(logits, labels), naive, rtol=1e-5)
  # Confident wrong logits: the naive log(pt) overflows, the log-sigmoid form does not.
  extreme = jnp.array([[200.0, -200.0, 50.0, -80.0]])
  extreme_labels = jnp.array([[0, 1, 1, 0]])
  value, grad = jax.value_and_grad(foreground.select_loss)(extreme, extreme_labels)
  assert np.isfinite(value) and value > 0
  assert np.all(np.isfinite(grad))


def test_image_without_boxes_gives_finite_loss():
  labels = _labels(np.zeros((3, 4)), [False] * 3, (64, 64), LEVELS)
  assert labels.sum() == 0
  loss = foreground.select_loss(jnp.zeros((1, labels.size)), labels[None])
  # All tokens negative with p = 0.5: 0.75 * 0.25 * log(2) each, divided by max(1, 0).
  np.testing.assert_allclose(loss, labels.size * 0.75 * 0.25 * np.log(2.0), rtol=1e-6)
