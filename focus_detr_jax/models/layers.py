"""Small building blocks shared by the backbone, neck, encoder and decoder.

Parameter names follow detrex so that one name mapping (convert/detrex.py) serves the converter,
the exporter and the gradient comparison. PyTorch numerics are kept: LayerNorm/GroupNorm eps 1e-5.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# torch.nn.LayerNorm / GroupNorm default eps (Flax defaults to 1e-6).
NORM_EPS = 1e-5


def island_dtype(dtype):
  """Dtype of the float32 islands (softmax logits, sampling locations, heads' outputs) for a
  compute dtype: float32 under bfloat16 or float32, float64 in the float64 numerics mode."""
  return jnp.promote_types(dtype, jnp.float32)


def layer_norm(name=None, dtype=jnp.float32):
  """torch LayerNorm numerics: eps 1e-5, two-pass variance (E[(x-mean)^2], not E[x^2]-mean^2)."""
  return nn.LayerNorm(epsilon=NORM_EPS, use_fast_variance=False, name=name, dtype=dtype)


def group_norm(num_groups=32, name=None, dtype=jnp.float32):
  """torch GroupNorm numerics: eps 1e-5, two-pass variance."""
  return nn.GroupNorm(num_groups=num_groups, epsilon=NORM_EPS, use_fast_variance=False, name=name,
                      dtype=dtype)


class Conv2d(nn.Module):
  """NHWC conv with torch padding semantics; `frozen` stops the gradient at the weights.

  Attributes:
    features: output channels.
    kernel_size, stride, padding: as torch.nn.Conv2d (square).
    use_bias: whether the conv has a bias.
    frozen: detectron2 `freeze_at`: the weights get a stop_gradient (exact zero gradient).
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = False
  frozen: bool = False
  dtype: jnp.dtype = jnp.float32
  kernel_init: nn.initializers.Initializer = nn.initializers.variance_scaling(
      2.0, "fan_out", "normal")

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, Cin] -> [B, H', W', features]."""
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
    if self.frozen:
      kernel = jax.lax.stop_gradient(kernel)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
        [(self.padding, self.padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,))
      if self.frozen:
        bias = jax.lax.stop_gradient(bias)
      y = y + bias.astype(self.dtype)
    return y


class FrozenBatchNorm(nn.Module):
  """detectron2 FrozenBatchNorm2d: y = (x - mean) / sqrt(var + eps) * weight + bias.

  All four statistics live in the `frozen` collection, outside `params`, so they never train
  (decisions §5). Initialised as the identity (running_var = 1 - eps, as detectron2).
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    """x: [..., C] -> [..., C]."""
    c = x.shape[-1]
    weight = self.variable("frozen", "weight", jnp.ones, (c,)).value
    bias = self.variable("frozen", "bias", jnp.zeros, (c,)).value
    mean = self.variable("frozen", "running_mean", jnp.zeros, (c,)).value
    var = self.variable("frozen", "running_var", lambda s: jnp.full(s, 1.0 - self.eps), (c,)).value
    scale = weight * jax.lax.rsqrt(var + self.eps)
    shift = bias - mean * scale
    return x * scale.astype(x.dtype) + shift.astype(x.dtype)


class MLP(nn.Module):
  """detrex MLP: Linear layers with ReLU between them (names `layers_{i}`)."""
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: jnp.dtype = jnp.float32
  last_zero_init: bool = False

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      init = nn.initializers.zeros if (last and self.last_zero_init) else nn.linear.default_kernel_init
      x = nn.Dense(self.output_dim if last else self.hidden_dim, kernel_init=init,
                   bias_init=nn.initializers.zeros if (last and self.last_zero_init)
                   else nn.initializers.zeros, dtype=self.dtype, name=f"layers_{i}")(x)
      if not last:
        x = nn.relu(x)
    return x


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch-first), fused `in_proj` [D, 3D] rows q;k;v.

  Attention logits are computed with q scaled by 1/sqrt(head_dim) first, as torch does.
  """
  embed_dim: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, key, value, key_valid: Optional[jnp.ndarray] = None,
               attn_mask: Optional[jnp.ndarray] = None):
    """Multi-head attention.

    Args:
      query: [B, Lq, D]; key, value: [B, Lk, D].
      key_valid: optional [B, Lk] bool, False keys are ignored.
      attn_mask: optional [B, Lq, Lk] bool, True = blocked (torch convention).
    Returns:
      [B, Lq, D].
    """
    d, h = self.embed_dim, self.num_heads
    hd = d // h
    in_proj = self.param("in_proj_kernel", nn.initializers.xavier_uniform(), (d, 3 * d))
    in_bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * d,))
    in_proj, in_bias = in_proj.astype(self.dtype), in_bias.astype(self.dtype)
    q = query @ in_proj[:, :d] + in_bias[:d]
    k = key @ in_proj[:, d:2 * d] + in_bias[d:2 * d]
    v = value @ in_proj[:, 2 * d:] + in_bias[2 * d:]
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(b, lq, h, hd) * (hd ** -0.5)
    k = k.reshape(b, lk, h, hd)
    v = v.reshape(b, lk, h, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(island_dtype(self.dtype))
    blocked = None
    if key_valid is not None:
      blocked = ~key_valid[:, None, None, :]
    if attn_mask is not None:
      blocked = attn_mask[:, None] if blocked is None else (blocked | attn_mask[:, None])
    if blocked is not None:
      logits = jnp.where(blocked, -jnp.inf, logits)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, lq, d)
    return nn.Dense(d, dtype=self.dtype, name="out_proj")(out)


class FFN(nn.Module):
  """detrex FFN: Linear(D, F) -> ReLU -> Linear(F, D) (names `layers_0_0`, `layers_1`)."""
  embed_dim: int
  ffn_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Dense(self.ffn_dim, dtype=self.dtype, name="layers_0_0")(x))
    return nn.Dense(self.embed_dim, dtype=self.dtype, name="layers_1")(y)


def gather_rows(x, idx):
  """Per-image row gather: x [B, N, ...], idx [B, K] int -> [B, K, ...]."""
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x, idx)


def scatter_rows(x, idx, rows):
  """Per-image row scatter (indices distinct per image): x [B, N, ...], idx [B, K], rows [B, K, ...]."""
  return jax.vmap(lambda a, i, r: a.at[i].set(r, unique_indices=True))(x, idx, rows)
