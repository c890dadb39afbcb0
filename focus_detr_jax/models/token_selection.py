"""Foreground Token Selector (FTS) and the fixed-capacity keep-ratio cascade.

detrex sizes its selections from the batch (valid tokens, T = max focus_token_nums, K_l); we
select at a static capacity computed from the padded input shape and reproduce the dynamic counts
with masks (decisions §2-3). The padding fill of the ranking key is the minimum score of the
batch group, as detrex's `masked_fill(pad, score.min())`.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.models.layers import XAVIER, island_dtype, layer_norm, torch_linear_bias


def focus_capacity(num_tokens: int, focus_rho: float) -> int:
  """Static T: focus_token_nums of an image whose tokens are all valid."""
  return int(np.float32(num_tokens) * np.float32(focus_rho)) + 1


def cascade_capacities(num_tokens: int, focus_rho: float, cascade: Sequence[float]):
  """Static K_l per encoder layer: int(float32(cascade[l]) * T) at full validity."""
  t = focus_capacity(num_tokens, focus_rho)
  return tuple(int(np.float32(c) * np.float32(t)) for c in cascade)


def focus_counts(valid_token_nums, focus_rho, cascade, group_size):
  """Dynamic detrex counts.

  Args:
    valid_token_nums: [B] int32 non-padded tokens per image.
    group_size: images coupled like one detrex per-GPU batch (B % group_size == 0).
  Returns:
    focus_token_nums [B] int32, layer_counts [B, num_layers] int32 (K_l of the image's group).
  """
  b = valid_token_nums.shape[0]
  if b % group_size:
    raise ValueError(f"batch size {b} is not a multiple of batch_group_size {group_size}")
  focus = (valid_token_nums.astype(jnp.float32) * jnp.float32(focus_rho)).astype(jnp.int32) + 1
  group_max = focus.reshape(b // group_size, group_size).max(axis=1)
  group_max = jnp.repeat(group_max, group_size)
  cascade = jnp.asarray(np.asarray(cascade, np.float32))
  counts = (cascade[None, :] * group_max[:, None].astype(jnp.float32)).astype(jnp.int32)
  return focus, counts


def fill_padded_scores(scores, token_valid, group_size):
  """detrex `masked_fill(pad, scores.min())` with the minimum taken inside each batch group.

  scores: [B, N], token_valid: [B, N] bool (True = valid) -> [B, N].
  """
  b, n = scores.shape
  group_min = scores.reshape(b // group_size, group_size * n).min(axis=1)
  group_min = jnp.repeat(group_min, group_size)[:, None]
  return jnp.where(token_valid, scores, group_min)


def _resize_bilinear_align_corners_weights(in_size, out_size):
  """Static 2-tap indices and weights of torch bilinear(align_corners=True) along one axis."""
  scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0.0)
  src = np.arange(out_size, dtype=np.float32) * scale
  i0 = np.floor(src).astype(np.int32)
  i0 = np.minimum(i0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, np.float32(1.0) - lam1, lam1


def upsample_bilinear_align_corners(x, out_hw):
  """torch F.interpolate(bilinear, align_corners=True): [B, H, W] -> [B, H', W']."""
  h0, h1, hl0, hl1 = _resize_bilinear_align_corners_weights(x.shape[1], out_hw[0])
  w0, w1, wl0, wl1 = _resize_bilinear_align_corners_weights(x.shape[2], out_hw[1])
  top = x[:, h0, :]
  bottom = x[:, h1, :]
  def along_w(rows):
    return wl0[None, None, :] * rows[:, :, w0] + wl1[None, None, :] * rows[:, :, w1]
  return hl0[None, :, None] * along_w(top) + hl1[None, :, None] * along_w(bottom)


class MaskPredictor(nn.Module):
  """detrex MaskPredictor(256, 256): per-token foreground logit with a per-level global half."""
  hidden_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, T, D] tokens of one level -> [B, T] logits."""
    # xavier kernels, torch-default biases: detrex's transformer init (layers.XAVIER).
    def dense(features, fan_in, name):
      return nn.Dense(features, kernel_init=XAVIER, bias_init=torch_linear_bias(fan_in),
                      dtype=self.dtype, name=name)

    z = layer_norm("layer1_0", self.dtype)(x)
    z = nn.gelu(dense(self.hidden_dim, x.shape[-1], "layer1_1")(z), approximate=False)
    half = self.hidden_dim // 2
    z_local, z_global = z[..., :half], z[..., half:]
    # The global half averages over every token of the level, padded ones included (detrex).
    z_global = jnp.broadcast_to(z_global.mean(axis=1, keepdims=True), z_global.shape)
    z = jnp.concatenate([z_local, z_global], axis=-1)
    z = nn.gelu(dense(half, self.hidden_dim, "layer2_0")(z), approximate=False)
    z = nn.gelu(dense(half // 2, half, "layer2_2")(z), approximate=False)
    logits = dense(1, half // 2, "layer2_4")(z)[..., 0]
    return logits.astype(island_dtype(self.dtype))


def foreground_scores(mask_predictor, alpha, fts_memory, spatial_shapes):
  """Top-down modulated foreground logits of every token (spec §2.3).

  Args:
    mask_predictor: the shared MaskPredictor.
    alpha: [L-1] learnt modulation coefficients.
    fts_memory: [B, N, D] enc_output_norm(enc_output(feat + pos)) with invalid rows zeroed.
    spatial_shapes: static tuple of L (H_l, W_l), finest first.
  Returns:
    [B, N] float32 logits (levels concatenated finest first) and the per-level list.
  """
  b = fts_memory.shape[0]
  sizes = [h * w for h, w in spatial_shapes]
  starts = np.concatenate([[0], np.cumsum(sizes)])
  levels = [fts_memory[:, starts[l]:starts[l + 1]] for l in range(len(spatial_shapes))]
  num_levels = len(spatial_shapes)
  scores = [None] * num_levels
  scores[-1] = mask_predictor(levels[-1])
  for l in range(num_levels - 2, -1, -1):
    h, w = spatial_shapes[l]
    coarse = scores[l + 1].reshape(b, *spatial_shapes[l + 1])
    up = upsample_bilinear_align_corners(coarse, (h, w)).reshape(b, h * w, 1)
    x = levels[l]
    # Coarse-to-fine: level l uses alpha[L-2-l] (alpha[0] links the two coarsest levels).
    modulated = x + x * up.astype(x.dtype) * alpha[num_levels - 2 - l].astype(x.dtype)
    scores[l] = mask_predictor(modulated)
  return jnp.concatenate(scores, axis=1), scores
