"""Small building blocks shared by the backbone, neck, encoder and decoder.

Parameter names follow detrex so that one name mapping (convert/detrex.py) serves the converter,
the exporter and the gradient comparison. PyTorch numerics are kept: LayerNorm/GroupNorm eps 1e-5.
"""

import functools
from typing import Optional

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


def _conv2d_forward(x, kernel, stride, padding):
  if kernel.shape[:2] == (1, 1) and padding == 0:
    # A 1x1 convolution is a matrix product over channels. XLA:CPU runs it 1.3-4x faster as a
    # dot than as a convolution (BENCHMARKS.md, issue 17); bitwise equal at the R50 shapes
    # measured, float32 rounding differences at small channel counts.
    return jnp.einsum("bhwc,cd->bhwd", x[:, ::stride, ::stride], kernel[0, 0])
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, stride: int, padding: int):
  """NHWC x HWIO convolution (torch padding semantics) whose kernel gradient is k*k matmuls.

  Forward and input gradient are XLA's convolution and its transpose (a dot for 1x1 kernels
  without padding). The kernel gradient
  `dW[i, j] = sum_{b,h,w} x_pad[b, h*s + i, w*s + j, :]^T dY[b, h, w, :]` is written as one
  [Cin, B H' W'] x [B H' W', Cout] matmul per kernel tap: XLA:CPU lowers the convolution form of
  the kernel gradient (a convolution whose window is the whole feature map) to a slow, poorly
  parallel kernel, ~3x the forward's time (BENCHMARKS.md, "Train step: profile, memory and
  rematerialisation"). Same sums, in another order (float32 rounding differences only).

  Args:
    x: [B, H, W, Cin]; kernel: [k, k, Cin, Cout]; stride, padding: static ints.
  Returns:
    [B, H', W', Cout], H' = (H + 2 padding - k) // stride + 1.
  """
  return _conv2d_forward(x, kernel, stride, padding)


def _conv2d_fwd(x, kernel, stride, padding):
  return _conv2d_forward(x, kernel, stride, padding), (x, kernel)


def _conv2d_bwd(stride, padding, residuals, g):
  with jax.named_scope("custom_bwd"):  # profiling.classify: a backward op
    return _conv2d_bwd_impl(stride, padding, residuals, g)


def _conv2d_bwd_impl(stride, padding, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda a: _conv2d_forward(a, kernel, stride, padding), x)
  (dx,) = input_vjp(g)
  k = kernel.shape[0]
  b, ho, wo, cout = g.shape
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  g2 = g.reshape(b * ho * wo, cout)
  taps = []
  for i in range(k):
    for j in range(k):
      patch = jax.lax.slice(xp, (0, i, j, 0),
                            (b, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, x.shape[3]),
                            (1, stride, stride, 1))                      # [B, H', W', Cin]
      taps.append(jnp.dot(patch.reshape(b * ho * wo, -1).T, g2,
                          preferred_element_type=island_dtype(kernel.dtype)))  # [Cin, Cout]
  dkernel = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)



# Initialisers as detrex (PyTorch) starts a model from scratch. torch.nn.Linear's default:
# kernel kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias U(+-1/sqrt(fan_in)); detrex's
# transformer then xavier-initialises every weight of dimension > 1 inside it (FFNs, attention
# output projections, MaskPredictor, ref_point_head), keeping the default biases.
TORCH_LINEAR_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
XAVIER = nn.initializers.xavier_uniform()


def torch_linear_bias(fan_in: int) -> nn.initializers.Initializer:
  """torch.nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


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
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)
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
  xavier: bool = False       # xavier kernels (inside detrex's transformer); else torch Linear

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      zero = last and self.last_zero_init
      x = nn.Dense(self.output_dim if last else self.hidden_dim,
                   kernel_init=nn.initializers.zeros if zero else (
                       XAVIER if self.xavier else TORCH_LINEAR_KERNEL),
                   bias_init=nn.initializers.zeros if zero else torch_linear_bias(x.shape[-1]),
                   dtype=self.dtype, name=f"layers_{i}")(x)
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
    out = softmax_attention(logits, v).reshape(b, lq, d)
    return nn.Dense(d, kernel_init=XAVIER, dtype=self.dtype, name="out_proj")(out)


@jax.custom_vjp
def softmax_attention(logits, v):
  """`einsum(softmax(logits), v)`: logits [B, h, Lq, Lk] float32 (blocked = -inf), v [B, Lk, h, hd]
  -> [B, Lq, h, hd] in v's dtype.

  The forward is the plain formulation. The backward uses `rowsum(dP * P) = rowsum(dO * O)`
  (as flash attention does): the softmax's [B, h, Lq, Lk] row reduction becomes one over
  [B, Lq, h, hd], about 1/3 less decoder self-attention backward time on XLA:CPU. Equal in
  exact arithmetic; float32 rounding differs.
  """
  return _softmax_attention(logits, v)[0]


def _softmax_attention(logits, v):
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v), weights


def _softmax_attention_fwd(logits, v):
  out, weights = _softmax_attention(logits, v)
  return out, (weights, v, out)


def _softmax_attention_bwd(residuals, g):
  with jax.named_scope("custom_bwd"):  # profiling.classify: a backward op
    return _softmax_attention_bwd_impl(residuals, g)


def _softmax_attention_bwd_impl(residuals, g):
  weights, v, out = residuals
  acc = weights.dtype
  d_weights = jnp.einsum("bqhd,bkhd->bhqk", g, v).astype(acc)
  d_v = jnp.einsum("bhqk,bqhd->bkhd", weights.astype(v.dtype), g)
  row = jnp.sum(g.astype(acc) * out.astype(acc), axis=-1)                     # [B, Lq, h]
  d_logits = weights * (d_weights - jnp.transpose(row, (0, 2, 1))[..., None])
  # Blocked logits (-inf, weight 0) get a zero cotangent, as autodiff of the softmax gives.
  return d_logits, d_v


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class FFN(nn.Module):
  """detrex FFN: Linear(D, F) -> ReLU -> Linear(F, D) (names `layers_0_0`, `layers_1`)."""
  embed_dim: int
  ffn_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Dense(self.ffn_dim, kernel_init=XAVIER,
                         bias_init=torch_linear_bias(x.shape[-1]), dtype=self.dtype,
                         name="layers_0_0")(x))
    return nn.Dense(self.embed_dim, kernel_init=XAVIER, bias_init=torch_linear_bias(
        self.ffn_dim), dtype=self.dtype, name="layers_1")(y)


def gather_rows(x, idx):
  """Per-image row gather: x [B, N, ...], idx [B, K] int -> [B, K, ...]."""
  return jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(x, idx)


def scatter_rows(x, idx, rows):
  """Per-image row scatter (indices distinct per image): x [B, N, ...], idx [B, K], rows [B, K, ...]."""
  return jax.vmap(lambda a, i, r: a.at[i].set(r, unique_indices=True))(x, idx, rows)
