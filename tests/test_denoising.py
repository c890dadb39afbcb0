"""Contrastive denoising queries (focus_detr_jax/train/denoising.py)."""

import functools
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from focus_detr_jax.parity import loss_stages
from focus_detr_jax.train import criterion, denoising, matcher

from conftest import default_r50_dir  # noqa: E402

# shared/parity/public when present, else the in-repo compact R50 set (conftest).
PARITY_DIR = Path(os.environ.get("FOCUS_DETR_PARITY_DIR", default_r50_dir()))

needs_parity = pytest.mark.skipif(not (PARITY_DIR / "dn_train.npz").exists(),
                                  reason="parity reference data absent")

DN_NUMBER = 6  # S = 12 slots per image
NUM_SLOTS = 2 * DN_NUMBER
NUM_QUERIES = 5
NUM_CLASSES = 7


@functools.partial(jax.jit, static_argnames=("label_noise_ratio", "box_noise_scale"))
def _build(labels, boxes, valid, draws, label_noise_ratio=0.5, box_noise_scale=1.0):
  return denoising.build_cdn_queries(
      labels, boxes, valid, draws, dn_number=DN_NUMBER, num_queries=NUM_QUERIES,
      label_noise_ratio=label_noise_ratio, box_noise_scale=box_noise_scale, batch_group_size=2)


def _targets(counts, num_targets=4, seed=0):
  """Targets with `counts[i]` valid boxes per image, valid slots scattered (not only first)."""
  rng = np.random.default_rng(seed)
  batch = len(counts)
  valid = np.zeros((batch, num_targets), bool)
  for i, n in enumerate(counts):
    valid[i, rng.permutation(num_targets)[:n]] = True
  centres = rng.uniform(0.4, 0.6, size=(batch, num_targets, 2))
  sizes = rng.uniform(0.05, 0.2, size=(batch, num_targets, 2))
  boxes = np.concatenate([centres, sizes], -1).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=(batch, num_targets)).astype(np.int32)
  return labels, boxes, valid


@pytest.fixture(scope="module")
def built():
  """Groups: images (0, 1) with 2 and 1 boxes -> n_max 2, G 3; images (2, 3) without boxes;
  images (4, 5) with 4 and 3 boxes -> n_max 4, G 1, pad_size 8 < 12."""
  labels, boxes, valid = _targets([2, 1, 0, 0, 4, 3])
  draws = denoising.sample_cdn_draws(jax.random.PRNGKey(0), 6, NUM_SLOTS, NUM_CLASSES)
  return (labels, boxes, valid), jax.device_get(_build(labels, boxes, valid, draws))


def test_group_sizes(built):
  _, dn = built
  np.testing.assert_array_equal(dn.num_groups, [3, 3, 0, 0, 1, 1])
  np.testing.assert_array_equal(dn.group_width, [4, 4, 0, 0, 8, 8])
  np.testing.assert_array_equal(dn.pad_size, [12, 12, 0, 0, 8, 8])
  np.testing.assert_array_equal(dn.dn_active.sum(1), dn.pad_size)


def test_slot_layout(built):
  (_, _, valid), dn = built
  # Image 0 (2 boxes, n_max 2): group g = slots [4g, 4g + 4), positives 4g + t, negatives
  # 4g + 2 + t.
  np.testing.assert_array_equal(np.nonzero(dn.dn_positive[0])[0], [0, 1, 4, 5, 8, 9])
  np.testing.assert_array_equal(np.nonzero(dn.dn_valid[0])[0], np.arange(12))
  # Image 1 (1 box): slot 4g is positive, 4g + 2 negative, 4g + 1 and 4g + 3 unfilled.
  np.testing.assert_array_equal(np.nonzero(dn.dn_positive[1])[0], [0, 4, 8])
  np.testing.assert_array_equal(np.nonzero(dn.dn_valid[1])[0], [0, 2, 4, 6, 8, 10])
  assert not dn.dn_valid[2:4].any()
  # Image 5 (3 boxes, n_max 4, G 1): positives 0..2, negatives 4..6, slots 8..11 inactive.
  np.testing.assert_array_equal(np.nonzero(dn.dn_positive[5])[0], [0, 1, 2])
  np.testing.assert_array_equal(np.nonzero(dn.dn_valid[5])[0], [0, 1, 2, 4, 5, 6])
  # The t-th slot of a group copies the t-th valid target (valid targets are scattered).
  for i in (0, 1, 4, 5):
    rank_to_target = np.nonzero(valid[i])[0]
    for s in np.nonzero(dn.dn_valid[i])[0]:
      assert dn.dn_target_index[i, s] == rank_to_target[s % (dn.group_width[i] // 2)]
  # Unfilled slots have detrex's zero box input.
  assert np.all(dn.dn_boxes_unact[~dn.dn_valid] == 0)


def test_attention_mask_structure(built):
  _, dn = built
  mask = dn.dn_attn_mask  # [B, S + Q, S + Q], True = blocked
  assert mask.shape == (6, NUM_SLOTS + NUM_QUERIES, NUM_SLOTS + NUM_QUERIES)
  # Matching queries never see DN slots and see each other.
  assert mask[:, NUM_SLOTS:, :NUM_SLOTS].all()
  assert not mask[:, NUM_SLOTS:, NUM_SLOTS:].any()
  # DN slots always see the matching queries.
  assert not mask[:, :NUM_SLOTS, NUM_SLOTS:].any()
  # Image 1: 3 groups of 4 slots, block-diagonal, unfilled slots included in their group.
  expected = ~np.kron(np.eye(3, dtype=bool), np.ones((4, 4), bool))
  np.testing.assert_array_equal(mask[1, :NUM_SLOTS, :NUM_SLOTS], expected)
  # Image 5: one group of 8; inactive slots 8..11 are seen by nobody and see no DN slot.
  dn_block = mask[5, :NUM_SLOTS, :NUM_SLOTS]
  assert not dn_block[:8, :8].any()
  assert dn_block[:, 8:].all() and dn_block[8:, :].all()
  # No DN at all in images 2, 3.
  assert mask[2, :NUM_SLOTS, :NUM_SLOTS].all()


def test_noise_ranges():
  labels, boxes, valid = _targets([4, 4], seed=1)
  key = jax.random.PRNGKey(3)
  draws = denoising.sample_cdn_draws(key, 2, NUM_SLOTS, NUM_CLASSES)
  dn = jax.device_get(_build(labels, boxes, valid, draws))
  clean = boxes[np.arange(2)[:, None], dn.dn_target_index]  # [B, S, 4]
  half = np.concatenate([clean[..., 2:], clean[..., 2:]], -1) / 2
  def corners(b):
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)
  # Boxes sit in [0.3, 0.7]: no clamping, so the corner shift / half-size is the drawn factor.
  factor = np.abs(corners(dn.dn_boxes) - corners(clean)) / half
  pos, neg = dn.dn_positive, dn.dn_valid & ~dn.dn_positive
  assert factor[pos].max() < 1 + 1e-4
  assert factor[neg].min() > 1 - 1e-4 and factor[neg].max() < 2 + 1e-4
  # inverse_sigmoid with eps 1e-3 (a negative copy can collapse to zero width).
  x = np.clip(dn.dn_boxes, 0, 1)
  unact = np.log(np.maximum(x, 1e-3) / np.maximum(1 - x, 1e-3))
  np.testing.assert_allclose(dn.dn_boxes_unact[dn.dn_valid], unact[dn.dn_valid], rtol=1e-5,
                             atol=1e-6)
  # Labels change only where the flip draw is below 0.25, to the drawn label.
  draws = jax.device_get(draws)
  flip = (draws.label_flip_u < 0.25) & dn.dn_valid
  clean_labels = labels[np.arange(2)[:, None], dn.dn_target_index]
  np.testing.assert_array_equal(dn.dn_labels[dn.dn_valid],
                                np.where(flip, draws.new_label, clean_labels)[dn.dn_valid])


def test_no_noise_gives_clean_copies():
  labels, boxes, valid = _targets([3, 2], seed=2)
  draws = denoising.sample_cdn_draws(jax.random.PRNGKey(5), 2, NUM_SLOTS, NUM_CLASSES)
  dn = jax.device_get(_build(labels, boxes, valid, draws, label_noise_ratio=0.0,
                             box_noise_scale=0.0))
  rows = np.arange(2)[:, None]
  filled = dn.dn_valid
  np.testing.assert_array_equal(dn.dn_labels[filled], labels[rows, dn.dn_target_index][filled])
  np.testing.assert_array_equal(dn.dn_boxes[filled], boxes[rows, dn.dn_target_index][filled])


def test_dn_loss_finite_and_nonzero(built):
  (labels, boxes, valid), dn = built
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, NUM_SLOTS, NUM_CLASSES)).astype(np.float32)
  pred = rng.uniform(0.3, 0.7, size=(6, NUM_SLOTS, 4)).astype(np.float32)
  s_labels, s_boxes = jax.device_get(matcher.sanitize_targets(labels, boxes, valid))
  losses = jax.device_get(criterion.denoising_losses(logits, pred, s_labels, s_boxes, dn,
                                                     float(valid.sum())))
  for value in losses.values():
    assert np.isfinite(value) and value > 0
  # Only the groups without boxes: DN contributes nothing.
  only_empty = jax.tree.map(lambda x: x[2:4], dn)
  losses = criterion.denoising_losses(logits[2:4], pred[2:4], s_labels[2:4], s_boxes[2:4],
                                      only_empty, 1.0)
  for value in losses.values():
    assert float(value) == 0.0


def test_recorded_draws_layout():
  # The given-arrays path: detrex rows (copy-major over the group's GTs) land in their slots.
  recorded = {
      "dn_known_bid": np.array([0, 1, 1, 0, 1, 1]),  # n = 3 GTs (1 + 2), 2 copies (G = 1)
      "dn_map_known_indice": np.array([0, 0, 1, 2, 2, 3]),  # n_max = 2: copy b, GT t -> 2b + t
      "draw0_label_flip_p": np.arange(6, dtype=np.float32) / 10,
      "draw1_label_new_label_dense": np.array([3, -1, 5, -1, -1, 1]),
      "draw2_box_rand_sign01": np.ones((6, 4), np.float32),
      "draw3_box_rand_part": np.full((6, 4), 0.5, np.float32),
  }
  draws = denoising.cdn_draws_from_detrex_rows(recorded, 2, 4)
  np.testing.assert_allclose(draws.label_flip_u, [[0.0, 0.0, 0.3, 0.0], [0.1, 0.2, 0.4, 0.5]])
  np.testing.assert_array_equal(draws.new_label, [[3, 0, 0, 0], [0, 5, 0, 1]])


@needs_parity
def test_queries_match_recorded_run():
  rows = loss_stages.compare_denoising(PARITY_DIR)
  assert len(rows) == 7
  for row in rows:
    assert row.passed, row
