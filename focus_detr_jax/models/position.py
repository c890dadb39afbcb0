"""Sine positional encodings (detrex PositionEmbeddingSine and get_sine_pos_embed)."""

import math

import jax.numpy as jnp
import numpy as np

from focus_detr_jax.ops.exact import exact_divide


def _dim_t(num_pos_feats, temperature):
  """T^(2*floor(k/2)/F), k = 0..F-1, computed in float32 like torch."""
  k = np.arange(num_pos_feats, dtype=np.float32)
  return jnp.asarray(np.float32(temperature) ** (2 * np.floor(k / 2) / np.float32(num_pos_feats)),
                     dtype=jnp.float32)


def _interleave_sin_cos(x):
  """[..., F] phases -> [..., F] as [sin(x0), cos(x1), sin(x2), cos(x3), ...]."""
  return jnp.stack([jnp.sin(x[..., 0::2]), jnp.cos(x[..., 1::2])], axis=-1).reshape(x.shape)


def normalized_positions(pixel_valid, offset=-0.5, scale=2 * math.pi, eps=1e-6,
                         dtype=jnp.float32):
  """PositionEmbeddingSine's normalised coordinates `(cumsum + offset) / (last + eps) * scale`.

  Args:
    pixel_valid: [B, H, W] bool, True = valid (detrex's `not_mask`).
  Returns:
    (y_embed, x_embed), each [B, H, W] `dtype`.
  """
  valid = pixel_valid.astype(dtype)
  y_embed = jnp.cumsum(valid, axis=1)
  x_embed = jnp.cumsum(valid, axis=2)
  # Divisions by a broadcast value: exact_divide keeps torch's rounding (XLA would multiply by
  # the reciprocal, one ulp off).
  y_embed = exact_divide(y_embed + offset, y_embed[:, -1:, :] + eps) * scale
  x_embed = exact_divide(x_embed + offset, x_embed[:, :, -1:] + eps) * scale
  return y_embed, x_embed


def sine_position_embedding(pixel_valid, num_pos_feats=128, temperature=10000.0, offset=-0.5,
                            scale=2 * math.pi, eps=1e-6, dtype=jnp.float32):
  """PositionEmbeddingSine(normalize=True) of one level.

  Args:
    pixel_valid: [B, H, W] bool, True = valid.
  Returns:
    [B, H, W, 2F] `dtype` (float32; float64 in the float64 numerics mode), channels
    [pos_y (F) | pos_x (F)], sin/cos interleaved.
  """
  y_embed, x_embed = normalized_positions(pixel_valid, offset, scale, eps, dtype)
  dim_t = _dim_t(num_pos_feats, temperature).astype(dtype)
  pos_x = _interleave_sin_cos(exact_divide(x_embed[..., None], dim_t))
  pos_y = _interleave_sin_cos(exact_divide(y_embed[..., None], dim_t))
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def sine_box_embedding(boxes, num_pos_feats=128, temperature=10000.0, scale=2 * math.pi):
  """get_sine_pos_embed(exchange_xy=True) of cxcywh boxes: [..., 4] -> [..., 4F] as [y, x, w, h]."""
  dim_t = _dim_t(num_pos_feats, temperature)
  phase_dtype = jnp.promote_types(boxes.dtype, dim_t.dtype)
  embeds = [_interleave_sin_cos(exact_divide((boxes[..., i:i + 1] * scale).astype(phase_dtype),
                                             dim_t.astype(phase_dtype))) for i in range(4)]
  embeds[0], embeds[1] = embeds[1], embeds[0]
  return jnp.concatenate(embeds, axis=-1)
