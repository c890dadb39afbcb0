"""Every mask in the package means True = valid (style §2.2); these catch a polarity slip."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import make_fake_batch
from focus_detr_jax.data import device, iterators
from focus_detr_jax.models.focus_detr import feature_level_shapes


def test_all_valid_pixels_equal_no_mask(tiny_model_and_variables):
  """`pixel_valid` all True is "no padding", the same program input as `pixel_valid=None`."""
  model, variables = tiny_model_and_variables
  images, _ = make_fake_batch(sizes=((128, 160), (128, 160)), seed=4)
  ones = jnp.ones(images.shape[:3], bool)
  for train in (False, True):
    f = jax.jit(lambda v, x, m, train=train: model.apply(v, x, m, train=train))
    with_ones = f(variables, images, ones)
    without = jax.jit(lambda v, x, train=train: model.apply(v, x, train=train))(variables, images)
    for k in ("pred_logits", "pred_boxes", "fg_score", "token_valid"):
      np.testing.assert_array_equal(np.asarray(with_ones[k]), np.asarray(without[k]), err_msg=k)
    assert bool(np.asarray(without["token_valid"]).all())


def test_token_valid_marks_the_image_tokens(tiny_model_and_variables, fake_batch):
  """Image 0 fills the canvas (every token valid); image 1 is padded (some tokens invalid), and
  `valid_token_nums` counts the True entries."""
  model, variables = tiny_model_and_variables
  images, pixel_valid = fake_batch
  assert bool(pixel_valid[0].all()) and not bool(pixel_valid[1].all())
  out, state = jax.jit(lambda v: model.apply(v, images, pixel_valid, train=True,
                                             mutable=["intermediates"]))(variables)
  token_valid = np.asarray(out["token_valid"])
  n = sum(h * w for h, w in feature_level_shapes(*images.shape[1:3]))
  assert token_valid.shape == (2, n) and token_valid[0].all()
  assert 0 < token_valid[1].sum() < n
  np.testing.assert_array_equal(np.asarray(state["intermediates"]["valid_token_nums"][0]),
                                token_valid.sum(1))
  # Level 0 (stride 8): image 1 is 96 x 120 in a 128 x 160 canvas -> 12 x 15 valid cells.
  h0, w0 = feature_level_shapes(*images.shape[1:3])[0]
  level0 = token_valid[1, :h0 * w0].reshape(h0, w0)
  assert level0[:12, :15].all() and not level0[12:].any() and not level0[:, 15:].any()


def test_normalisation_marks_padding_false():
  """Host and device normalisation: `pixel_valid` True inside `image_size`, False outside."""
  u8 = np.random.default_rng(0).integers(0, 256, (2, 6, 7, 3)).astype(np.uint8)
  sizes = np.asarray([[6, 7], [4, 3]], np.int32)
  want = np.zeros((2, 6, 7), bool)
  want[0] = True
  want[1, :4, :3] = True
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  image, pixel_valid = iterators.normalize_batch(u8, sizes, mean, std)
  np.testing.assert_array_equal(pixel_valid, want)
  assert not image[~want].any()
  out = device.normalize_on_device({"image": u8, "image_size": sizes}, mean, std)
  np.testing.assert_array_equal(np.asarray(out["pixel_valid"]), want)
  np.testing.assert_array_equal(np.asarray(out["image"]), image)
