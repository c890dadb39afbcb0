"""Bound-sensitive arithmetic against detrex's float32 formulas, swept over every level shape.

Every image side the configs can produce (1..1333 after the resize rules) gives level sides
1..167 (strides 8-64, each stride-2 stage rounding up); every valid count 0..side can occur in a
padded batch. For each, the jitted program must give exactly what detrex's float32 arithmetic
(numpy float32 here: IEEE division, then the comparison) gives. The proposals' `(0.01, 0.99)`
validity is where a one-ulp change flips a result (e.g. `49.5 / 50` on every height-800 image);
valid ratios, reference points, the position normalisation, the mask resize and the token
counts are checked bit for bit too, since XLA rewrites a division by a broadcast value into a
multiplication by its reciprocal (ops/exact.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from focus_detr_jax.models import token_selection
from focus_detr_jax.models.focus_detr import (encoder_proposals, encoder_reference_points,
                                              feature_level_shapes, grid_axis_proposals,
                                              level_valid_ratios, nearest_resize_mask,
                                              nearest_source_indices)
from focus_detr_jax.models.position import normalized_positions
from focus_detr_jax.ops.exact import exact_divide

F32 = np.float32
MAX_SIDE = 1333


def _level_sides():
  """Every level side (any level) of an input side 1..1333."""
  sides = set()
  for side in range(1, MAX_SIDE + 1):
    sides.update(h for h, _ in feature_level_shapes(side, 1))
  return sorted(sides)


LEVEL_SIDES = _level_sides()


def _detrex_axis(side, counts):
  """detrex: grid (i + 0.5) / valid in float32, then (> 0.01) & (< 0.99)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    coord = (np.arange(side, dtype=F32)[None] + F32(0.5)) / counts.astype(F32)[:, None]
    unact = np.log(coord / (F32(1) - coord))
  return coord, (coord > F32(0.01)) & (coord < F32(0.99)), unact


def test_level_sides_cover_every_config_size():
  assert LEVEL_SIDES == list(range(1, 168))


def test_proposal_axis_validity_sweep_is_bit_exact():
  """One program holding every level side (as the model holds its 4): valid counts 0..side."""
  counts = jnp.arange(LEVEL_SIDES[-1] + 1, dtype=jnp.int32)
  outputs = jax.device_get(jax.jit(lambda c: [grid_axis_proposals(c[:side + 1], side)
                                              for side in LEVEL_SIDES])(counts))
  mismatches = {}
  for side, (_, valid) in zip(LEVEL_SIDES, outputs):
    _, ref_valid, _ = _detrex_axis(side, np.arange(side + 1))
    bad = int(np.sum(valid != ref_valid))
    if bad:
      mismatches[side] = bad
  assert not mismatches, f"validity differs from detrex at level sides {mismatches}"
  for side, (unact, _) in zip(LEVEL_SIDES, outputs):
    _, ref_valid, ref_unact = _detrex_axis(side, np.arange(side + 1))
    np.testing.assert_allclose(unact[ref_valid], ref_unact[ref_valid], rtol=1e-6, atol=1e-6)
    assert np.all(np.isinf(unact[~ref_valid]))


def test_the_height_800_bound_cases():
  """49.5 / 50 == float32(0.99) and 0.5 / 50 == float32(0.01): both rows invalid (detrex)."""
  unact, valid = jax.device_get(jax.jit(grid_axis_proposals, static_argnums=1)(
      jnp.asarray([50], jnp.int32), 50))
  assert not valid[0, 49] and not valid[0, 0] and valid[0, 1:49].all()


@pytest.mark.parametrize("canvas", [(800, 1067), (800, 1333), (1333, 800), (512, 768),
                                    (256, 256), (640, 480)])
def test_encoder_proposals_end_to_end_on_canvases(canvas):
  """Whole encoder_proposals (4 levels, batch of padded images) against detrex's formula."""
  rng = np.random.default_rng(sum(canvas))
  h, w = canvas
  heights = np.concatenate([[h, 1, h], rng.integers(1, h + 1, 5)])
  widths = np.concatenate([[w, w, 1], rng.integers(1, w + 1, 5)])
  image_mask = np.ones((len(heights), h, w), bool)
  for b, (ih, iw) in enumerate(zip(heights, widths)):
    image_mask[b, :ih, :iw] = False
  shapes = feature_level_shapes(h, w)
  level_masks = [nearest_resize_mask(image_mask, hw) for hw in shapes]   # detrex: True = padded
  unact, valid = jax.device_get(jax.jit(
      lambda vs: encoder_proposals(vs, shapes))([jnp.asarray(~m) for m in level_masks]))
  ref_valid, ref_unact = [], []
  for lvl, (m, (lh, lw)) in enumerate(zip(level_masks, shapes)):
    valid_h = (~m[:, :, 0]).sum(1)
    valid_w = (~m[:, 0, :]).sum(1)
    cy, vy, uy = _detrex_axis(lh, valid_h)
    cx, vx, ux = _detrex_axis(lw, valid_w)
    size = F32(0.05) * F32(2.0 ** lvl)
    v = vy[:, :, None] & vx[:, None, :] & ~m
    ref_valid.append(v.reshape(len(m), -1))
    u = np.stack(np.broadcast_arrays(ux[:, None, :], uy[:, :, None],
                                     np.log(size / (F32(1) - size)),
                                     np.log(size / (F32(1) - size))), -1)
    ref_unact.append(u.reshape(len(m), -1, 4))
  ref_valid = np.concatenate(ref_valid, 1)
  ref_unact = np.concatenate(ref_unact, 1)
  assert int(np.sum(valid != ref_valid)) == 0
  np.testing.assert_allclose(unact[ref_valid], ref_unact[ref_valid], rtol=1e-6, atol=1e-6)
  assert np.all(np.isinf(unact[~ref_valid]))


def _row_masks(side, batch):
  """[batch, side, 1] detrex masks (True = padded): example b has min(b, side) valid rows
  (0..side all occur)."""
  return np.arange(side)[None, :, None] >= np.minimum(np.arange(batch), side)[:, None, None]


def test_valid_ratios_and_reference_points_sweep_are_bit_exact():
  """Every level side in one program; valid counts 0..side each."""
  batch = LEVEL_SIDES[-1] + 1
  valids = [jnp.asarray(~_row_masks(side, batch)) for side in LEVEL_SIDES]  # ours: True = valid

  def program(valids):
    out = []
    for side, valid in zip(LEVEL_SIDES, valids):
      ratios = level_valid_ratios([valid])
      out.append((ratios, encoder_reference_points([(side, 1)], ratios)))
    return out

  bad_ratio, bad_ref = [], []
  for side, (ratios, refs) in zip(LEVEL_SIDES, jax.device_get(jax.jit(program)(valids))):
    mask = _row_masks(side, batch)
    ref_ratio_h = (~mask[:, :, 0]).sum(1).astype(F32) / F32(side)     # valid_H.float() / H
    ref_ratio_w = (~mask[:, 0, :]).sum(1).astype(F32) / F32(1)
    if not (np.array_equal(ratios[:, 0, 1], ref_ratio_h)
            and np.array_equal(ratios[:, 0, 0], ref_ratio_w)):
      bad_ratio.append(side)
    with np.errstate(divide="ignore", invalid="ignore"):
      ref_y = (np.arange(side, dtype=F32)[None] + F32(0.5)) / (ref_ratio_h[:, None] * F32(side))
      ref_y = ref_y * ref_ratio_h[:, None]
    if not np.array_equal(refs[:, :, 0, 1], ref_y, equal_nan=True):
      bad_ref.append(side)
  assert not bad_ratio, f"valid ratios differ from valid / size at sides {bad_ratio}"
  assert not bad_ref, f"reference points differ from detrex's float32 formula at sides {bad_ref}"


def _detrex_normalized(mask):
  """PositionEmbeddingSine: (cumsum(~mask) - 0.5) / (last + 1e-6) * 2 pi, float32."""
  not_mask = (~mask).astype(F32)
  y = np.cumsum(not_mask, 1, dtype=F32)
  x = np.cumsum(not_mask, 2, dtype=F32)
  y = (y + F32(-0.5)) / (y[:, -1:, :] + F32(1e-6)) * F32(2 * math.pi)
  x = (x + F32(-0.5)) / (x[:, :, -1:] + F32(1e-6)) * F32(2 * math.pi)
  return y, x


def test_position_normalisation_sweep_is_bit_exact():
  """Every (cell, valid count) pair of every level side: `(min(i + 1, v) - 0.5) / (v + 1e-6)`
  depends on the side only through i < side, so the largest side with v = 1..167 covers all of
  them; padded along rows and along columns."""
  side = LEVEL_SIDES[-1]
  rows = np.arange(side)[None, :, None] >= np.arange(1, side + 1)[:, None, None]   # [167, 167, 1]
  fn = jax.jit(lambda ms: [normalized_positions(m) for m in ms])
  masks = [rows, rows.transpose(0, 2, 1)]
  outputs = jax.device_get(fn([jnp.asarray(~m) for m in masks]))   # detrex masks -> valid
  for mask, ours in zip(masks, outputs):
    ref = _detrex_normalized(mask)
    for axis, o, r in zip("yx", ours, ref):
      bad = np.argwhere(o != r)
      assert not len(bad), f"{axis} normalisation differs from detrex at (image, row, col) {bad[:5]}"


def test_exact_divide_matches_ieee_division_under_broadcast():
  numer = np.arange(MAX_SIDE, dtype=F32)[None] + F32(0.5)
  denom = np.arange(1, MAX_SIDE + 1, dtype=F32)[:, None]
  ours = jax.device_get(jax.jit(exact_divide)(jnp.asarray(numer), jnp.asarray(denom)))
  assert np.array_equal(ours, numer / denom)


def test_nearest_mask_resize_sweep():
  """torch nearest: src = min(floor(float32(dst) * (float32(in) / out)), in - 1)."""
  bad = []
  for side in range(1, MAX_SIDE + 1):
    for out in {h for h, _ in feature_level_shapes(side, 1)}:
      if out == side:
        ref = np.arange(out)
      else:
        scale = F32(side) / F32(out)
        ref = np.minimum(np.floor(np.arange(out, dtype=F32) * scale).astype(np.int64), side - 1)
      if not np.array_equal(nearest_source_indices(side, out), ref):
        bad.append((side, out))
  assert not bad, bad[:10]


def test_token_counts_sweep():
  """int(valid * 0.5) + 1 and int(cascade_l * T) in float32, for every token count up to a
  1333x1333 canvas, against Python float32 arithmetic."""
  config = common.get_base_config().model
  n_max = sum(h * w for h, w in feature_level_shapes(MAX_SIDE, MAX_SIDE))
  valid = np.arange(n_max + 1, dtype=np.int32)
  focus, counts = jax.device_get(jax.jit(functools.partial(
      token_selection.focus_counts, focus_rho=config.focus_rho, cascade=config.cascade,
      group_size=1))(jnp.asarray(valid)))
  ref_focus = (valid.astype(F32) * F32(config.focus_rho)).astype(np.int64) + 1
  assert np.array_equal(focus, ref_focus)
  ref_counts = (np.asarray(config.cascade, F32)[None] * ref_focus.astype(F32)[:, None]
                ).astype(np.int64)
  assert np.array_equal(counts, ref_counts)
  # The static capacities use the same rule at full validity.
  for n in (1, 2, 3, 1000, 17821, 22223, n_max):
    assert token_selection.cascade_capacities(n, config.focus_rho, config.cascade) == tuple(
        int(F32(c) * F32(int(F32(n) * F32(config.focus_rho)) + 1)) for c in config.cascade)
