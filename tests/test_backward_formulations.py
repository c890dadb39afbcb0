"""Hand-written backward passes (models/layers.py) against autodiff of the plain formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focus_detr_jax.models.layers import conv2d, softmax_attention


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1),
                                                   (7, 2, 3)])
def test_conv2d_gradients_match_autodiff(kernel, stride, padding):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 5)), jnp.float32)     # odd sizes: uneven strides
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 6)), jnp.float32)

  def plain(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  ours = jax.grad(loss(lambda x, w: conv2d(x, w, stride, padding)), (0, 1))(x, w)
  ref = jax.grad(loss(plain), (0, 1))(x, w)
  if kernel > 1:   # XLA's convolution and its transpose: the same program
    np.testing.assert_array_equal(conv2d(x, w, stride, padding), plain(x, w))
    np.testing.assert_array_equal(ours[0], ref[0])
  else:            # 1x1 as a dot: the same sums, float32 rounding may differ
    np.testing.assert_allclose(conv2d(x, w, stride, padding), plain(x, w), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5, atol=1e-5)


def test_softmax_attention_gradients_match_autodiff():
  rng = np.random.default_rng(0)
  b, h, q, k, d = 2, 3, 7, 9, 4
  logits = rng.normal(size=(b, h, q, k)).astype(np.float32)
  blocked = rng.uniform(size=(b, 1, q, k)) < 0.3
  blocked[..., 0] = False                                             # no fully blocked row
  logits = jnp.asarray(np.where(blocked, -np.inf, logits))
  v = jnp.asarray(rng.normal(size=(b, k, h, d)), jnp.float32)

  def plain(l, v):
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(l, axis=-1), v)

  loss = lambda f: lambda l, v: jnp.sum(jnp.sin(f(l, v)) * jnp.arange(d))
  np.testing.assert_array_equal(softmax_attention(logits, v), plain(logits, v))
  ours = jax.grad(loss(softmax_attention), (0, 1))(logits, v)
  ref = jax.grad(loss(plain), (0, 1))(logits, v)
  np.testing.assert_array_equal(ours[0] == 0, ref[0] == 0)           # blocked entries: zero
  for a, r in zip(ours, ref):
    np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
