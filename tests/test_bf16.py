"""bf16 compute with float32 islands (decisions §6) on the tiny config.

The same float32 variables run with `model.dtype='bfloat16'` and 'float32'; the bf16 model must
run, stay finite, keep its top-k keys in float32, and choose top-k sets that overlap the float32
ones: the cascade's `fg_inds` per encoder layer and the two-stage top-Q proposals.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_fake_batch
from focus_detr_jax.models.focus_detr import FocusDETR


def topk_overlap(a, b):
  """Mean over images of |set(a_i) & set(b_i)| / k for index arrays [B, k]."""
  a, b = np.asarray(a), np.asarray(b)
  return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / a.shape[1]
                        for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def runs(tiny_config):
  """(outputs, intermediates) per dtype on one batch, with shared float32 variables."""
  images, pixel_valid = make_fake_batch(seed=7)
  results, variables = {}, None
  for dtype in ("float32", "bfloat16"):
    config = tiny_config.copy_and_resolve_references()
    config.model.dtype = dtype
    model = FocusDETR.from_config(config.model)
    if variables is None:
      variables = jax.jit(lambda k: model.init(k, images, pixel_valid))(jax.random.PRNGKey(0))
    fn = jax.jit(lambda v, x, m: model.apply(v, x, m, mutable=["intermediates"]))
    out, state = fn(variables, images, pixel_valid)
    results[dtype] = (out, state["intermediates"])
  return results


def test_bf16_runs_and_is_finite(runs, tiny_config):
  out, inter = runs["bfloat16"]
  for name, value in out.items():
    arr = np.asarray(value, np.float32)
    assert np.all(np.isfinite(arr)), name
  # Float32 islands: detection heads, top-k keys and reference points come back in float32.
  for name in ("pred_logits", "pred_boxes", "enc_pred_boxes", "init_reference", "fg_score",
               "inter_references"):
    assert out[name].dtype == jnp.float32, name
  assert inter["fg_score_masked"][0].dtype == jnp.float32
  assert inter["enc_outputs_class_max_all"][0].dtype == jnp.float32
  # The compute really is bf16 (neck features), and it changes the logits.
  assert inter["neck_features"][0][0].dtype == jnp.bfloat16
  diff = np.abs(np.asarray(out["pred_logits"]) - np.asarray(runs["float32"][0]["pred_logits"]))
  assert diff.max() > 0  # (per-query values are not comparable: the chosen queries differ)
  boxes = np.asarray(out["pred_boxes"])
  assert boxes.min() >= 0.0 and boxes.max() <= 1.0


def test_bf16_and_float32_choose_overlapping_topk(runs, tiny_config):
  (_, i32), (_, i16) = runs["float32"], runs["bfloat16"]
  (o32, _), (o16, _) = runs["float32"], runs["bfloat16"]
  overlaps = {}
  for l in range(tiny_config.model.num_encoder_layers):
    a = i32[f"encoder_layer{l}"][0]["fg_inds"]
    b = i16[f"encoder_layer{l}"][0]["fg_inds"]
    overlaps[f"fg_inds_layer{l} (k={a.shape[1]})"] = topk_overlap(a, b)
  k = o32["enc_topk_proposals"].shape[1]
  overlaps[f"enc_topk_proposals (k={k})"] = topk_overlap(o32["enc_topk_proposals"],
                                                         o16["enc_topk_proposals"])
  print("bf16 vs float32 top-k overlap:", overlaps)
  # The ranking keys differ by bf16 rounding of the network only; the selected sets must agree
  # for the most part (observed: see BENCHMARKS.md "bf16").
  for name, value in overlaps.items():
    floor = 0.9 if name.startswith("fg_inds") else 0.6
    assert value >= floor, (name, value)
  fg32 = np.asarray(i32["fg_score_masked"][0])
  fg16 = np.asarray(i16["fg_score_masked"][0])
  assert np.corrcoef(fg32.ravel(), fg16.ravel())[0, 1] > 0.99
