"""The Focus-DETR training objective (focus_detr_jax/train/criterion.py)."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from focus_detr_jax.parity import loss_stages
from focus_detr_jax.train import criterion, denoising

from conftest import default_r50_dir  # noqa: E402

# shared/parity/public when present, else the in-repo compact R50 set (conftest).
PARITY_DIR = Path(os.environ.get("FOCUS_DETR_PARITY_DIR", default_r50_dir()))

needs_parity = pytest.mark.skipif(not (PARITY_DIR / "dn_train.npz").exists(),
                                  reason="parity reference data absent")

# Tiny problem: 2 images of 32x32, 3 decoder layers, 10 queries, 5 classes, 4 target slots.
BATCH, QUERIES, CLASSES, SLOTS, LAYERS, DN_NUMBER = 2, 10, 5, 4, 3, 4
LEVEL_SHAPES = ((4, 4), (2, 2), (1, 1), (1, 1))
NUM_TOKENS = sum(h * w for h, w in LEVEL_SHAPES)


@needs_parity
def test_loss_terms_match_reference():
  rows = loss_stages.compare_loss_terms(PARITY_DIR)
  ran = [r for r in rows if r.passed is not None]
  stages = [r.stage for r in ran]
  assert "dn_train.npz total" in stages
  assert any(s.startswith("dn_train.npz loss terms (40/40") for s in stages)
  for row in ran:
    assert row.passed, row


@needs_parity
def test_names_and_weights_match_reference():
  with np.load(PARITY_DIR / "losses_train.npz") as ref:
    names, weights = [str(n) for n in ref["loss_names"]], ref["loss_weight"]
  assert list(criterion.loss_names(5)) == names
  config = criterion.LossConfig()
  assert [config.weight(n) for n in names] == weights.tolist()


def test_config_defaults_equal_detrex():
  assert criterion.LossConfig.from_config(common.get_base_config()) == criterion.LossConfig()


def _random_outputs(seed):
  rng = np.random.default_rng(seed)
  def logits(*shape):
    return rng.normal(size=shape).astype(np.float32) * 2
  def boxes(*shape):
    return rng.uniform(0.05, 0.95, size=shape).astype(np.float32)
  return {
      "pred_logits": logits(BATCH, QUERIES, CLASSES), "pred_boxes": boxes(BATCH, QUERIES, 4),
      "aux_pred_logits": logits(LAYERS - 1, BATCH, QUERIES, CLASSES),
      "aux_pred_boxes": boxes(LAYERS - 1, BATCH, QUERIES, 4),
      "enc_pred_logits": logits(BATCH, QUERIES, CLASSES),
      "enc_pred_boxes": boxes(BATCH, QUERIES, 4),
      "fg_score": logits(BATCH, NUM_TOKENS),
      "dn_pred_logits": logits(LAYERS, BATCH, 2 * DN_NUMBER, CLASSES),
      "dn_pred_boxes": boxes(LAYERS, BATCH, 2 * DN_NUMBER, 4),
  }


def _targets(counts, seed=0):
  rng = np.random.default_rng(seed)
  valid = np.arange(SLOTS)[None, :] < np.asarray(counts)[:, None]
  centres = rng.uniform(0.3, 0.7, size=(BATCH, SLOTS, 2))
  sizes = rng.uniform(0.1, 0.5, size=(BATCH, SLOTS, 2))
  return {"boxes": np.concatenate([centres, sizes], -1).astype(np.float32),
          "labels": rng.integers(0, CLASSES, size=(BATCH, SLOTS)).astype(np.int32),
          "box_valid": valid, "image_size": np.full((BATCH, 2), 32, np.int32)}


def _loss(outputs, targets, key):
  draws = denoising.sample_cdn_draws(key, BATCH, 2 * DN_NUMBER, CLASSES)
  dn = denoising.build_cdn_queries(
      targets["labels"], targets["boxes"], targets["box_valid"], draws, dn_number=DN_NUMBER,
      num_queries=QUERIES, label_noise_ratio=0.5, box_noise_scale=1.0, batch_group_size=2)
  num_boxes = jnp.sum(targets["box_valid"])
  return criterion.focus_detr_loss(outputs, targets, num_boxes, level_shapes=LEVEL_SHAPES, dn=dn)


@pytest.fixture(scope="module")
def loss_and_grad():
  """One compiled value-and-grad of the total loss w.r.t. every prediction array."""
  return jax.jit(jax.value_and_grad(_loss, has_aux=True))


def test_total_is_weighted_sum_and_grads_finite(loss_and_grad):
  outputs = _random_outputs(0)
  (total, aux), grads = loss_and_grad(outputs, _targets([3, 2]), jax.random.PRNGKey(0))
  names = criterion.loss_names(LAYERS - 1)
  # (jit returns dicts with sorted keys; the order of `loss_names` is detrex's.)
  assert set(aux["losses"]) == set(names) == set(aux["weighted"]) and len(names) == 22
  config = criterion.LossConfig()
  expected = sum(config.weight(n) * float(aux["losses"][n]) for n in names)
  np.testing.assert_allclose(float(total), expected, rtol=1e-6)
  assert all(float(v) > 0 for v in aux["losses"].values())  # DN on, every term active
  assert int(aux["num_nonfinite_costs"]) == 0
  assert aux["matching"].query_index.shape == (LAYERS + 1, BATCH, SLOTS)
  for name, grad in grads.items():
    assert np.all(np.isfinite(grad)), name
    assert np.any(grad != 0), name


@pytest.mark.parametrize("counts", [(0, 2), (0, 0)])
def test_images_without_boxes_give_finite_loss(loss_and_grad, counts):
  (total, aux), grads = loss_and_grad(_random_outputs(1), _targets(counts), jax.random.PRNGKey(1))
  assert np.isfinite(float(total))
  for grad in jax.tree.leaves(grads):
    assert np.all(np.isfinite(grad))
  if sum(counts) == 0:
    # No box in the batch: only the background focal terms and select_loss remain; no DN.
    for name, value in aux["losses"].items():
      if "bbox" in name or "giou" in name or "_dn" in name:
        assert float(value) == 0.0, name


# DN off: one compiled program shared by the tests below.
_loss_dn_off = jax.jit(lambda o, t: criterion.focus_detr_loss(o, t, 5.0, level_shapes=LEVEL_SHAPES))


def test_dn_off_gives_zero_dn_terms():
  outputs = {k: v for k, v in _random_outputs(2).items() if not k.startswith("dn_")}
  total, aux = _loss_dn_off(outputs, _targets([3, 2]))
  dn_terms = [n for n in aux["losses"] if "_dn" in n]
  assert len(dn_terms) == 3 * LAYERS
  assert all(float(aux["losses"][n]) == 0.0 for n in dn_terms)
  assert np.isfinite(float(total))


def test_nan_predictions_are_counted():
  outputs = _random_outputs(3)
  outputs = {k: v for k, v in outputs.items() if not k.startswith("dn_")}
  outputs["pred_logits"] = outputs["pred_logits"].copy()
  outputs["pred_logits"][0, 0] = np.nan
  _, aux = _loss_dn_off(outputs, _targets([3, 2]))
  assert int(aux["num_nonfinite_costs"]) == 3  # query 0 x the 3 targets of image 0
