"""Model structure tests on the tiny config: static shapes, masks, cascade, OESM, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_fake_batch
from focus_detr_jax.models import token_selection
from focus_detr_jax.models.encoder import select_object_tokens
from focus_detr_jax.models.focus_detr import FocusDETR, feature_level_shapes, nearest_resize_mask


def test_output_shapes(tiny_config, tiny_model_and_variables, fake_batch):
  model, variables = tiny_model_and_variables
  images, pixel_valid = fake_batch
  out = jax.jit(lambda v, x, m: model.apply(v, x, m))(variables, images, pixel_valid)
  m = tiny_config.model
  q, c, b = m.num_queries, m.num_classes, images.shape[0]
  n = sum(h * w for h, w in feature_level_shapes(*images.shape[1:3]))
  assert out["pred_logits"].shape == (b, q, c)
  assert out["pred_boxes"].shape == (b, q, 4)
  assert out["aux_pred_logits"].shape == (m.num_decoder_layers - 1, b, q, c)
  assert out["enc_pred_logits"].shape == (b, q, c)
  assert out["fg_score"].shape == (b, n)
  assert out["inter_references"].shape == (m.num_decoder_layers, b, q, 4)
  for v in jax.tree_util.tree_leaves(out):
    assert np.all(np.isfinite(np.asarray(v, np.float64)) | (np.asarray(v) == 0)), "non-finite output"


def test_frozen_bn_outside_params_and_level_shapes(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.model.backbone.norm = "frozen_bn"
  model = FocusDETR.from_config(config.model)
  images, pixel_valid = make_fake_batch(canvas=(100, 130), sizes=((100, 130), (70, 90)))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, pixel_valid))
  frozen = jax.tree_util.tree_leaves_with_path(shapes["frozen"])
  assert frozen and all("running_var" in str(p) or "running_mean" in str(p) or "weight" in str(p)
                        or "bias" in str(p) for p, _ in frozen)
  assert not any("norm" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      shapes["params"]["backbone"]))
  out = jax.eval_shape(lambda v: model.apply(v, images, pixel_valid, mutable=["intermediates"]),
                       shapes)
  neck = out[1]["intermediates"]["neck_features"][0]
  assert tuple(f.shape[1:3] for f in neck) == feature_level_shapes(100, 130)


def test_one_compilation_per_padded_shape(tiny_model_and_variables):
  """Two batches with different image sizes inside one canvas share one compiled program."""
  model, variables = tiny_model_and_variables
  f = jax.jit(lambda v, x, m: model.apply(v, x, m)["pred_logits"])
  a = make_fake_batch(sizes=((128, 160), (96, 120)), seed=1)
  b = make_fake_batch(sizes=((80, 100), (128, 64)), seed=2)
  f(variables, *a).block_until_ready()
  f(variables, *b).block_until_ready()
  assert f._cache_size() == 1


def test_eval_detections_do_not_depend_on_batch_mates(tiny_model_and_variables):
  model, variables = tiny_model_and_variables
  f = jax.jit(lambda v, x, m: model.apply(v, x, m))
  a_img, a_valid = make_fake_batch(sizes=((96, 120), (128, 160)), seed=3)
  b_img, b_valid = make_fake_batch(sizes=((96, 120), (50, 60)), seed=3)
  # Same first image, different second image (its content and size).
  b_img = b_img.at[0].set(a_img[0])
  b_img = b_img.at[1].set(jnp.asarray(np.random.default_rng(9).normal(size=b_img.shape[1:])))
  out_a, out_b = f(variables, a_img, a_valid), f(variables, b_img, b_valid)
  np.testing.assert_allclose(out_a["pred_logits"][0], out_b["pred_logits"][0], atol=1e-5)
  np.testing.assert_allclose(out_a["pred_boxes"][0], out_b["pred_boxes"][0], atol=1e-6)


def test_unselected_tokens_keep_neck_values(tiny_model_and_variables, fake_batch):
  model, variables = tiny_model_and_variables
  images, pixel_valid = fake_batch
  _, state = jax.jit(lambda v: model.apply(v, images, pixel_valid, train=True,
                                           mutable=["intermediates"]))(variables)
  inter = state["intermediates"]
  neck = inter["neck_features"][0]
  feat = np.concatenate([np.asarray(f).reshape(f.shape[0], -1, f.shape[-1]) for f in neck], 1)
  memory = np.asarray(inter["memory"][0])
  focus = np.asarray(inter["focus_token_nums"][0])
  counts = np.asarray(inter["layer_counts"][0])
  for b in range(feat.shape[0]):
    written = set()
    for l in range(counts.shape[1]):
      idx = np.asarray(inter[f"encoder_layer{l}"][0]["fg_inds"])[b]
      written |= set(idx[:min(focus[b], counts[b, l])].tolist())
    untouched = np.setdiff1d(np.arange(feat.shape[1]), sorted(written))
    assert len(untouched) > 0
    np.testing.assert_array_equal(memory[b, untouched], feat[b, untouched])
    assert not np.allclose(memory[b, sorted(written)], feat[b, sorted(written)])


def test_focus_counts_reproduce_detrex_arithmetic():
  valid = jnp.asarray([2044, 3190, 100, 101], jnp.int32)
  cascade = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
  focus, counts = token_selection.focus_counts(valid, 0.5, cascade, group_size=2)
  np.testing.assert_array_equal(focus, [1023, 1596, 51, 51])
  # K_l = int(float32(cascade) * max focus of the group)
  np.testing.assert_array_equal(counts[0], [1596, 1276, 957, 957, 638, 319])
  np.testing.assert_array_equal(counts[1], counts[0])
  np.testing.assert_array_equal(counts[2], [51, 40, 30, 30, 20, 10])
  assert token_selection.cascade_capacities(3190, 0.5, cascade) == (1596, 1276, 957, 957, 638, 319)
  assert token_selection.cascade_capacities(22223, 0.5, cascade) == (
      11112, 8889, 6667, 6667, 4444, 2222)
  with pytest.raises(ValueError, match="batch_group_size"):
    token_selection.focus_counts(valid[:3], 0.5, cascade, group_size=2)


def test_fill_padded_scores_uses_group_minimum():
  scores = jnp.asarray([[3.0, 1.0, 2.0], [5.0, -4.0, 0.0], [7.0, 8.0, 9.0], [6.0, 6.5, 6.2]])
  token_valid = jnp.asarray([[True, True, False], [True, False, True], [True, True, False],
                             [False, True, True]])
  filled = token_selection.fill_padded_scores(scores, token_valid, 2)
  np.testing.assert_array_equal(filled, np.float32([[3, 1, -4], [5, -4, 0], [7, 8, 6], [6, 6.5, 6.2]]))


def test_oesm_selection_detrex_mode_and_safe_shrink():
  rng = np.random.default_rng(0)
  k = 50
  mc = jnp.asarray(rng.normal(size=(2, k)), jnp.float32)
  candidate = jnp.arange(k)[None] < jnp.asarray([[40], [40]])
  token_valid = jnp.ones((2, k), bool).at[0, :5].set(False)
  # detrex mode (K_l = 40 >= topk_sa = 10): padded candidates may be chosen, as in detrex.
  sel, sel_valid = select_object_tokens(mc, candidate, token_valid, topk_sa=10)
  expected = np.argsort(-np.where(np.asarray(candidate), np.asarray(mc), -np.inf), 1)[:, :10]
  np.testing.assert_array_equal(sel, expected)
  assert bool(sel_valid.all())
  # Where detrex crashes (K_l = 8 < topk_sa): the selection shrinks to valid candidates only.
  candidate = jnp.arange(k)[None] < 8
  sel, sel_valid = select_object_tokens(mc, jnp.broadcast_to(candidate, (2, k)), token_valid, 30)
  assert sel.shape == (2, 30)
  np.testing.assert_array_equal(np.asarray(sel_valid).sum(1), [3, 8])
  for b in range(2):
    chosen = np.asarray(sel)[b][np.asarray(sel_valid)[b]]
    assert set(chosen.tolist()) <= set(range(8))
    assert all(bool(token_valid[b, i]) for i in chosen)


def test_small_input_does_not_crash(tiny_config, tiny_model_and_variables):
  """detrex issue #354: fewer tokens than topk_sa. Ours shrinks instead of crashing."""
  model, variables = tiny_model_and_variables
  images, pixel_valid = make_fake_batch(canvas=(64, 64), sizes=((64, 64), (40, 40)))
  out = jax.jit(lambda v, x, m: model.apply(v, x, m, train=True))(variables, images, pixel_valid)
  assert np.all(np.isfinite(np.asarray(out["pred_logits"])))


def test_nearest_mask_resize_matches_torch_rule():
  mask = np.zeros((1, 10, 10), bool)
  mask[:, 7:, :] = True
  out = np.asarray(nearest_resize_mask(jnp.asarray(mask), (4, 3)))
  src_rows = np.floor(np.arange(4) * np.float32(10 / 4)).astype(int)   # 0, 2, 5, 7
  np.testing.assert_array_equal(out[0, :, 0], mask[0, src_rows, 0])


def test_upsample_align_corners_matches_formula():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 4)), jnp.float32)
  y = np.asarray(token_selection.upsample_bilinear_align_corners(x, (5, 7)))
  ys = np.arange(5) * (3 - 1) / (5 - 1)
  xs = np.arange(7) * (4 - 1) / (7 - 1)
  xn = np.asarray(x[0], np.float64)
  ref = np.zeros((5, 7))
  for i, sy in enumerate(ys):
    for j, sx in enumerate(xs):
      y0, x0 = int(np.floor(sy)), int(np.floor(sx))
      y1, x1 = min(y0 + 1, 2), min(x0 + 1, 3)
      fy, fx = sy - y0, sx - x0
      ref[i, j] = ((1 - fy) * ((1 - fx) * xn[y0, x0] + fx * xn[y0, x1])
                   + fy * ((1 - fx) * xn[y1, x0] + fx * xn[y1, x1]))
  np.testing.assert_allclose(y[0], ref, atol=1e-6)


def test_frozen_stem_gets_exact_zero_gradient(tiny_model_and_variables, fake_batch):
  model, variables = tiny_model_and_variables
  images, pixel_valid = fake_batch

  def loss(params):
    out = model.apply({**variables, "params": params}, images, pixel_valid, train=True)
    return (out["pred_logits"].mean() + out["pred_boxes"].mean() + out["fg_score"].mean()
            + out["enc_pred_boxes"].mean())

  grads = jax.jit(jax.grad(loss))(variables["params"])
  stem = grads["backbone"]["stem_conv1"]["kernel"]
  assert np.all(np.asarray(stem) == 0)
  assert np.any(np.asarray(grads["backbone"]["res2_0"]["conv1"]["kernel"]) != 0)
  assert np.any(np.asarray(grads["enc_mask_predictor"]["layer2_4"]["kernel"]) != 0)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(np.asarray(leaf)))
