"""Multi-scale deformable attention (Deformable DETR), pure JAX.

Sampling follows `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`:
the pixel coordinate of a normalised location `u` on a level of width W is `u * W - 0.5`, and
corner taps outside the map contribute zero. Every formulation below computes that same function
with the same per-corner float32 arithmetic (torch's, op for op); they differ in how the value
rows are fetched and in the order of the final float32 sums (differences ~1e-7):

- `gather`: one flat `[B * N * M, Dh]` table, one row gather per bilinear corner (4 gathers), a
  weighted sum per corner, then the attention-weighted sum (decisions §11). The reference.
- `window`: per level, the map gets a one-pixel zero border (`[B (H_l+2), W_l+2, M, Dh]`), so
  the 4 corners of a sample are one 2x2 window: one gather with 4x fewer indices, the border
  replaces the per-corner bounds masks, and the backward scatter-adds 4x fewer windows. The
  bilinear combination has a hand-written VJP (see `_bilinear_combine`); reverse mode only.
- `gather_window_vjp`: the `gather` forward with the `window` backward (a custom VJP that saves
  only the inputs and re-gathers windows in the backward): outputs bit-identical to `gather`,
  the smallest residuals, and on XLA:CPU a forward+backward ~3x faster than gather's (a bit
  slower than `window`'s, which does not re-gather). Reverse mode only.
- `gather_vjp`: the `gather` forward with a hand-written backward from the same four row
  gathers: per corner, the dot of the gathered row with the output cotangent (no [.., Dh]
  sample tensor is kept or rebuilt) gives the attention-weight and location cotangents, and
  one scatter-add per corner gives the value cotangent. Outputs bit-identical to `gather`.
  Reverse mode only. The CPU `auto` choice.
- `per_level`: per level and corner, `take_along_axis` on `[B, M, H_l W_l, Dh]` (the layout of
  the PyTorch reference `multi_scale_deformable_attn_pytorch`); the naive baseline.
- `onehot_matmul`: per level, a dense sampling matrix `[B, M, Q, H_l W_l]` built from separable
  one-hot bilinear weights (attention folded in), contracted with the values by a matmul
  (`precision=HIGHEST`), chunked over queries to bound memory (the backward recomputes each
  chunk's matrices). Gather-free, for matmul-rich, gather-poor accelerators; quadratic in
  tokens (slow on CPU).

`ms_deform_attn` dispatches to its `implementation` argument, which the modules take from the
model config (`config.model.msda_implementation`, an attribute of `FocusDETR`, so a model of
another formulation is another static jit argument); `"auto"` resolves per
`jax.default_backend()` via `AUTO_IMPLEMENTATION` (measurements: BENCHMARKS.md, "Deformable
attention formulations").
"""

import functools
import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.models.layers import island_dtype
from focus_detr_jax.ops.exact import exact_divide

IMPLEMENTATIONS = ("gather", "window", "gather_window_vjp", "gather_vjp", "per_level",
                   "onehot_matmul")
# CPU, measured (BENCHMARKS.md, "Deformable attention formulations", 3 runs on a shared 2-core
# machine): forward, gather = gather_window_vjp = per_level (window ties at encoder size but is up
# to 3x slower at decoder size; onehot_matmul 17-42x slower); forward+backward vs gather: window
# 3.3-5.6x, gather_window_vjp 2.8-4.9x, per_level 1.1-1.8x, onehot_matmul 0.2-0.3x.
# `gather_window_vjp` was picked (superseded on CPU by `gather_vjp`, see below): its forward *is* the gather program (the fastest forward, and
# bit-identical outputs, so eval and the parity checks see exactly the reference formulation)
# and its backward is window's; `window` would save another ~10-20% of the deformable-attention
# fwd+bwd time in training but changes outputs by ~4e-7. GPU/TPU: not measured in this project
# yet (no accelerator lent); they keep `gather`, the formulation the parity checks were
# established with, until `scripts/benchmark_msda.py` has been run there.
# Issue 17: in the whole R50 train step (512x768, batch 2, CPU) `gather_vjp` beat
# `gather_window_vjp` (14.2 s vs 14.8 s per step, 7.1 vs 7.7 GiB XLA temporaries; BENCHMARKS.md,
# "Train step: profile, memory and rematerialisation"), although alone at encoder size it was
# ~15% slower (0.83 vs 0.72 s): in the step XLA shares its four row gathers with the forward's.
AUTO_IMPLEMENTATION = {"cpu": "gather_vjp", "gpu": "gather", "tpu": "gather"}
# Elements of one dense sampling-matrix chunk in `onehot_matmul` (float32: 4 bytes each).
ONEHOT_CHUNK_ELEMENTS = 1 << 26

def resolve_implementation(name: str = "auto", backend: Optional[str] = None) -> str:
  """The concrete formulation `name` ("auto" or one of IMPLEMENTATIONS) means on `backend`."""
  if name == "auto":
    return AUTO_IMPLEMENTATION.get(backend or jax.default_backend(), "gather")
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown deformable attention implementation {name!r}; "
                     f"expected 'auto' or one of {IMPLEMENTATIONS}")
  return name


def level_start_index(spatial_shapes: Sequence[Tuple[int, int]]):
  """Static start offsets of each level in the flattened token axis."""
  sizes = [h * w for h, w in spatial_shapes]
  return tuple(int(s) for s in np.concatenate([[0], np.cumsum(sizes)[:-1]]))


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights,
                   implementation: str = "auto"):
  """Core multi-scale deformable attention.

  Args:
    value: [B, N, M, Dh] projected values of all levels (N = sum H_l W_l).
    spatial_shapes: static tuple of L (H_l, W_l).
    sampling_locations: [B, Q, M, L, P, 2] normalised (x, y) in the padded map of each level.
    attention_weights: [B, Q, M, L, P], already softmaxed over (L, P).
    implementation: formulation to use ("auto": per backend, `AUTO_IMPLEMENTATION`).
  Returns:
    [B, Q, M * Dh] in value's dtype (sums in float32; float64 for float64 locations).
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  impl = resolve_implementation(implementation)
  return _FORMULATIONS[impl](value, spatial_shapes, sampling_locations, attention_weights)


def _pixel_coordinates(spatial_shapes, sampling_locations):
  """torch's grid_sample arithmetic, op for op: grid = 2 loc - 1, pixel = ((grid+1) size - 1) / 2.

  Returns x, y [B, Q, M, L, P] pixel coordinates (float32, or float64 in the float64 mode) and
  the [L, 1] int32 heights, widths.
  """
  heights = jnp.asarray([s[0] for s in spatial_shapes], jnp.int32)[:, None]       # [L, 1]
  widths = jnp.asarray([s[1] for s in spatial_shapes], jnp.int32)[:, None]
  acc = island_dtype(sampling_locations.dtype)
  grid = 2.0 * sampling_locations.astype(acc) - 1.0
  x = ((grid[..., 0] + 1.0) * widths.astype(acc) - 1.0) / 2.0                      # [B,Q,M,L,P]
  y = ((grid[..., 1] + 1.0) * heights.astype(acc) - 1.0) / 2.0
  return x, y, heights, widths


def _corner_weights(x, y):
  """Floor corner and the 4 bilinear weights {(dx, dy): w} exactly as grid_sample computes them."""
  x_nw = jnp.floor(x)
  y_nw = jnp.floor(y)
  weights = {
      (0, 0): (x_nw + 1.0 - x) * (y_nw + 1.0 - y),
      (1, 0): (x - x_nw) * (y_nw + 1.0 - y),
      (0, 1): (x_nw + 1.0 - x) * (y - y_nw),
      (1, 1): (x - x_nw) * (y - y_nw),
  }
  return x_nw.astype(jnp.int32), y_nw.astype(jnp.int32), weights


def _attend(sampled, attention_weights, value_dtype):
  """Attention-weighted sum of bilinear samples [B, Q, M, K, Dh] (K = L P) -> [B, Q, M * Dh]."""
  b, q, m, k, dh = sampled.shape
  weights = attention_weights.astype(sampled.dtype).reshape(b, q, m, k)
  out = jnp.einsum("bqmk,bqmkd->bqmd", weights, sampled)
  return out.reshape(b, q, m * dh).astype(value_dtype)


def _ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights):
  """4 row gathers (one per corner) from the flat [B * N * M, Dh] value table."""
  b, n, m, dh = value.shape
  _, q, _, num_levels, num_points, _ = sampling_locations.shape
  starts = jnp.asarray(level_start_index(spatial_shapes), jnp.int32)[:, None]      # [L, 1]
  x, y, heights, widths = _pixel_coordinates(spatial_shapes, sampling_locations)
  x0, y0, corner_weights = _corner_weights(x, y)
  # Row of (image, token, head) in the flat value table, without the token part.
  base = (jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None] * n * m
          + jnp.arange(m, dtype=jnp.int32)[None, None, :, None, None])
  table = value.reshape(b * n * m, dh)
  sampled = jnp.zeros((b, q, m, num_levels * num_points, dh), x.dtype)
  for (dx, dy), w in corner_weights.items():
    xi = x0 + dx
    yi = y0 + dy
    inside = (xi >= 0) & (xi < widths) & (yi >= 0) & (yi < heights)
    token = starts + jnp.clip(yi, 0, heights - 1) * widths + jnp.clip(xi, 0, widths - 1)
    rows = base + token * m                                                         # [B,Q,M,L,P]
    tap = jnp.where(inside, w, 0.0).reshape(b, q, m, num_levels * num_points, 1)
    gathered = jnp.take(table, rows.reshape(-1), axis=0).reshape(
        b, q, m, num_levels * num_points, dh)
    sampled = sampled + tap * gathered.astype(x.dtype)
  # Bilinear value of every (level, point) first, then the attention-weighted sum (as torch).
  return _attend(sampled, attention_weights, value.dtype)


def _ms_deform_attn_window(value, spatial_shapes, sampling_locations, attention_weights):
  """Per level, one 2x2-window gather per sample from the zero-bordered level map."""
  b, n, m, dh = value.shape
  _, q, _, num_levels, num_points, _ = sampling_locations.shape
  x, y, _, _ = _pixel_coordinates(spatial_shapes, sampling_locations)
  x0, y0, corner_weights = _corner_weights(x, y)
  attn = attention_weights.astype(x.dtype)
  dnums = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3), collapsed_slice_dims=(2,),
                                         start_index_map=(0, 1, 2))
  out = jnp.zeros((b, q, m, dh), x.dtype)
  for lvl, ((h, w), s) in enumerate(zip(spatial_shapes, level_start_index(spatial_shapes))):
    # One zero row/column around the level (grid_sample's zero padding); M stays inside the
    # row so no transpose is needed. [B (H + 2), W + 2, M, Dh]
    table = jnp.pad(value[:, s:s + h * w].reshape(b, h, w, m, dh),
                    ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0))).reshape(b * (h + 2), w + 2, m, dh)
    xl, yl = x0[:, :, :, lvl], y0[:, :, :, lvl]                              # [B, Q, M, P]
    # The sample touches the level iff its floor corner lies in [-1, W-1] x [-1, H-1]; then its
    # four corners lie on the level or its zero border. Other samples are masked.
    inside = (xl >= -1) & (xl < w) & (yl >= -1) & (yl < h)
    col = jnp.clip(xl, -1, w - 1) + 1
    row = (jnp.clip(yl, -1, h - 1) + 1
           + jnp.arange(b, dtype=jnp.int32)[:, None, None, None] * (h + 2))
    head = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[None, None, :, None], row.shape)
    starts = jnp.stack([row, col, head], axis=-1).reshape(-1, 3)           # [B Q M P, 3]
    window = jax.lax.gather(table, starts, dnums, slice_sizes=(2, 2, 1, dh),
                            mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    window = window.reshape(b, q, m, num_points, 2, 2, dh).astype(x.dtype)  # [.., dy, dx, Dh]
    cw = {k: v[:, :, :, lvl] for k, v in corner_weights.items()}
    taps = jnp.stack([jnp.stack([cw[(0, 0)], cw[(1, 0)]], -1),
                      jnp.stack([cw[(0, 1)], cw[(1, 1)]], -1)], -2)             # [B,Q,M,P,2,2]
    taps = jnp.where(inside[..., None, None], taps, 0.0)
    sampled = _bilinear_combine(taps, window)                               # [B, Q, M, P, Dh]
    # Attention-weighted sum per level (bilinear value first, as torch), levels summed after.
    out = out + jnp.einsum("bqmp,bqmpd->bqmd", attn[:, :, :, lvl], sampled)
  return out.reshape(b, q, m * dh).astype(value.dtype)


def _bilinear_combine_elementwise(taps, window):
  """taps [..., 2, 2], window [..., 2, 2, Dh] -> [..., Dh]: grid_sample's corner order (nw, ne,
  sw, se) as one elementwise expression, which XLA fuses with the window gather."""
  return (taps[..., 0, 0, None] * window[..., 0, 0, :] + taps[..., 0, 1, None] * window[..., 0, 1, :]
          + taps[..., 1, 0, None] * window[..., 1, 0, :]
          + taps[..., 1, 1, None] * window[..., 1, 1, :])


@jax.custom_vjp
def _bilinear_combine(taps, window):
  """Bilinear combination of 2x2 windows with a hand-written VJP.

  The forward is elementwise (an einsum here becomes millions of 4-long dots, ~3x slower on
  XLA:CPU); autodiff of the elementwise form would reduce over Dh with a slow XLA:CPU reduction
  fusion, so the taps' cotangent is written as an einsum instead (~3x faster backward).
  Reverse mode only: `jax.jvp` through the `window` formulation is not supported.
  """
  return _bilinear_combine_elementwise(taps, window)


def _bilinear_combine_fwd(taps, window):
  return _bilinear_combine_elementwise(taps, window), (taps, window)


def _bilinear_combine_bwd(residuals, g):
  taps, window = residuals
  d_taps = jnp.einsum("...ijd,...d->...ij", window, g)
  d_window = taps[..., None] * g[..., None, None, :]
  return d_taps, d_window


_bilinear_combine.defvjp(_bilinear_combine_fwd, _bilinear_combine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ms_deform_attn_gather_window_vjp(value, spatial_shapes, sampling_locations,
                                      attention_weights):
  """`gather` forward, `window` backward (its VJP re-gathers from the saved inputs)."""
  return _ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)


def _gather_fwd(value, spatial_shapes, sampling_locations, attention_weights):
  """Forward of the `gather_*vjp` formulations: gather's output; residuals: the inputs."""
  out = _ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)
  return out, (value, sampling_locations, attention_weights)


def _gather_window_vjp_bwd(spatial_shapes, residuals, g):
  _, vjp = jax.vjp(lambda v, loc, a: _ms_deform_attn_window(v, spatial_shapes, loc, a),
                   *residuals)
  return vjp(g)


_ms_deform_attn_gather_window_vjp.defvjp(_gather_fwd, _gather_window_vjp_bwd)


def _corner_rows(spatial_shapes, value_shape, x0, y0, heights, widths):
  """Flat-table rows and in-map masks of the 4 bilinear corners: {(dx, dy): (rows, inside)},
  each [B, Q, M, L, P] int32 / bool (the `gather` formulation's indexing)."""
  b, n, m, _ = value_shape
  starts = jnp.asarray(level_start_index(spatial_shapes), jnp.int32)[:, None]      # [L, 1]
  base = (jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None] * n * m
          + jnp.arange(m, dtype=jnp.int32)[None, None, :, None, None])
  out = {}
  for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
    xi, yi = x0 + dx, y0 + dy
    inside = (xi >= 0) & (xi < widths) & (yi >= 0) & (yi < heights)
    token = starts + jnp.clip(yi, 0, heights - 1) * widths + jnp.clip(xi, 0, widths - 1)
    out[(dx, dy)] = (base + token * m, inside)
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ms_deform_attn_gather_vjp(value, spatial_shapes, sampling_locations, attention_weights):
  """`gather` forward, and a hand-written backward built from the same row gathers."""
  return _ms_deform_attn_gather(value, spatial_shapes, sampling_locations, attention_weights)


def _gather_vjp_bwd(spatial_shapes, residuals, g):
  """Backward of `gather` without materialising any [.., L P, Dh] sample tensor.

  With a = attention weight, w_c = corner c's bilinear weight (0 off the map), v_c = its value
  row and g = the output cotangent [Dh] of the sample's (query, head):
    d_value[row_c] += a w_c g                    (one scatter-add per corner)
    s_c = <g, v_c>                               (gather fused with the Dh reduction)
    d_a = sum_c w_c s_c ;  d_w_c = a s_c  ->  d_x, d_y by the product rule of w_c(x, y)
  and d_location = (W d_x, H d_y) (x = loc W - 1/2 in pixels, grid_sample's arithmetic).
  """
  with jax.named_scope("custom_bwd"):  # profiling.classify: a backward op
    return _gather_vjp_bwd_impl(spatial_shapes, residuals, g)


def _gather_vjp_bwd_impl(spatial_shapes, residuals, g):
  value, sampling_locations, attention_weights = residuals
  b, n, m, dh = value.shape
  _, q, _, num_levels, num_points, _ = sampling_locations.shape
  x, y, heights, widths = _pixel_coordinates(spatial_shapes, sampling_locations)
  acc = x.dtype
  x_nw, y_nw = jnp.floor(x), jnp.floor(y)
  x0, y0 = x_nw.astype(jnp.int32), y_nw.astype(jnp.int32)
  fx1, fy1 = x - x_nw, y - y_nw                       # weights of the +1 corners per axis
  fx0, fy0 = x_nw + 1.0 - x, y_nw + 1.0 - y
  corners = _corner_rows(spatial_shapes, value.shape, x0, y0, heights, widths)
  table = value.reshape(b * n * m, dh)
  attn = attention_weights.astype(acc)                                        # [B,Q,M,L,P]
  gq = g.reshape(b, q, m, 1, 1, dh).astype(acc)
  factors = {(0, 0): (fx0, fy0), (1, 0): (fx1, fy0), (0, 1): (fx0, fy1), (1, 1): (fx1, fy1)}
  d_attn = jnp.zeros_like(attn)
  d_x = jnp.zeros_like(attn)
  d_y = jnp.zeros_like(attn)
  d_table = jnp.zeros((b * n * m, dh), acc)
  for (dx, dy), (rows, inside) in corners.items():
    gathered = jnp.take(table, rows.reshape(-1), axis=0).reshape(
        b, q, m, num_levels, num_points, dh)
    s = jnp.where(inside, jnp.sum(gathered.astype(acc) * gq, axis=-1), 0.0)  # [B,Q,M,L,P]
    fx, fy = factors[(dx, dy)]
    d_attn = d_attn + fx * fy * s
    d_w = attn * s
    # w = fx fy, fx = x - x_nw (dx = 1) or x_nw + 1 - x (dx = 0): d fx / d x = +-1.
    d_x = d_x + (d_w * fy if dx else -(d_w * fy))
    d_y = d_y + (d_w * fx if dy else -(d_w * fx))
    tap = jnp.where(inside, attn * fx * fy, 0.0)
    # One scatter-add per corner (a concatenation of the four would copy every update again).
    d_table = d_table.at[rows.reshape(-1)].add((tap[..., None] * gq).reshape(-1, dh))
  d_value = d_table.reshape(value.shape).astype(value.dtype)
  # x = ((2 loc - 1 + 1) W - 1) / 2: d x / d loc = W, as autodiff of _pixel_coordinates.
  w_l = widths.astype(acc)                                                   # [L, 1]
  h_l = heights.astype(acc)
  d_loc = jnp.stack([(d_x / 2.0) * w_l * 2.0, (d_y / 2.0) * h_l * 2.0], axis=-1)
  return (d_value, d_loc.astype(sampling_locations.dtype),
          d_attn.astype(attention_weights.dtype))


_ms_deform_attn_gather_vjp.defvjp(_gather_fwd, _gather_vjp_bwd)


def _ms_deform_attn_per_level(value, spatial_shapes, sampling_locations, attention_weights):
  """Per level and corner, `take_along_axis` on [B, M, H_l W_l, Dh] (the PyTorch-reference layout)."""
  b, n, m, dh = value.shape
  _, q, _, num_levels, num_points, _ = sampling_locations.shape
  x, y, heights, widths = _pixel_coordinates(spatial_shapes, sampling_locations)
  x0, y0, corner_weights = _corner_weights(x, y)
  starts = level_start_index(spatial_shapes)
  per_level = []
  for lvl, ((h, w), s) in enumerate(zip(spatial_shapes, starts)):
    v = jnp.transpose(value[:, s:s + h * w], (0, 2, 1, 3))                 # [B, M, HW, Dh]
    sampled = jnp.zeros((b, m, q * num_points, dh), x.dtype)
    for (dx, dy), cw in corner_weights.items():
      xi = x0[:, :, :, lvl] + dx                                            # [B, Q, M, P]
      yi = y0[:, :, :, lvl] + dy
      inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      token = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
      token = jnp.transpose(token, (0, 2, 1, 3)).reshape(b, m, q * num_points, 1)
      tap = jnp.transpose(jnp.where(inside, cw[:, :, :, lvl], 0.0), (0, 2, 1, 3))
      gathered = jnp.take_along_axis(v, token, axis=2)                      # [B, M, Q P, Dh]
      sampled = sampled + tap.reshape(b, m, q * num_points, 1) * gathered.astype(x.dtype)
    per_level.append(jnp.transpose(sampled.reshape(b, m, q, num_points, dh), (0, 2, 1, 3, 4)))
  sampled = jnp.stack(per_level, axis=3).reshape(b, q, m, num_levels * num_points, dh)
  return _attend(sampled, attention_weights, value.dtype)


def _onehot_axis(i0, frac0, frac1, size):
  """Separable bilinear weights along one axis: [..., size] with frac0 at i0 and frac1 at i0+1.

  `jax.nn.one_hot` of an index outside [0, size) is all zeros: grid_sample's zero padding.
  """
  return (jax.nn.one_hot(i0, size, dtype=frac0.dtype) * frac0[..., None]
          + jax.nn.one_hot(i0 + 1, size, dtype=frac0.dtype) * frac1[..., None])


def _ms_deform_attn_onehot_matmul(value, spatial_shapes, sampling_locations, attention_weights):
  """Dense per-level sampling matrices times the values (matmuls, no gathers)."""
  b, n, m, dh = value.shape
  _, q, _, num_levels, num_points, _ = sampling_locations.shape
  x, y, _, _ = _pixel_coordinates(spatial_shapes, sampling_locations)
  x_nw = jnp.floor(x)
  y_nw = jnp.floor(y)
  # The 1-d factors of grid_sample's corner weights (nw = fx0 * fy0, ne = fx1 * fy0, ...).
  fx0, fx1 = x_nw + 1.0 - x, x - x_nw
  fy0, fy1 = y_nw + 1.0 - y, y - y_nw
  x0, y0 = x_nw.astype(jnp.int32), y_nw.astype(jnp.int32)
  attn = attention_weights.astype(x.dtype)
  starts = level_start_index(spatial_shapes)
  levels = [jnp.transpose(value[:, s:s + h * w], (0, 2, 1, 3)).astype(x.dtype)
            for (h, w), s in zip(spatial_shapes, starts)]                   # [B, M, HW, Dh]
  hp = jax.lax.Precision.HIGHEST

  def block(args):
    """Queries of one chunk: args are [B, Qc, M, L, P] arrays -> [B, Qc, M, Dh]."""
    x0c, y0c, fx0c, fx1c, fy0c, fy1c, attnc = args
    out = 0.0
    for lvl, (h, w) in enumerate(spatial_shapes):
      wy = _onehot_axis(y0c[:, :, :, lvl], fy0c[:, :, :, lvl], fy1c[:, :, :, lvl], h)
      wx = _onehot_axis(x0c[:, :, :, lvl], fx0c[:, :, :, lvl], fx1c[:, :, :, lvl], w)
      wy = wy * attnc[:, :, :, lvl, :, None]                               # [B, Qc, M, P, H]
      dense = jnp.einsum("bqmph,bqmpw->bmqhw", wy, wx, precision=hp)
      dense = dense.reshape(b, m, -1, h * w)                               # [B, M, Qc, HW]
      out = out + jnp.einsum("bmqn,bmnd->bqmd", dense, levels[lvl], precision=hp)
    return out

  # Rematerialised: the backward rebuilds each chunk's sampling matrices instead of saving them
  # (saved, they would be the whole dense [B, M, Q, N] matrix: ~8 GB at encoder size).
  block = jax.checkpoint(block)
  args = (x0, y0, fx0, fx1, fy0, fy1, attn)
  chunk = max(1, min(q, ONEHOT_CHUNK_ELEMENTS // max(1, b * m * n)))
  if chunk >= q:
    out = block(args)
  else:
    num_chunks = -(-q // chunk)
    pad = num_chunks * chunk - q
    # Padded queries sample nowhere (zero attention) and are dropped afterwards.
    padded = [jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) for a in args]
    chunked = [jnp.moveaxis(a.reshape((b, num_chunks, chunk) + a.shape[2:]), 1, 0)
               for a in padded]
    out = jax.lax.map(block, tuple(chunked))                              # [C, B, Qc, M, Dh]
    out = jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * chunk, m, dh)[:, :q]
  return out.reshape(b, q, m * dh).astype(value.dtype)


_FORMULATIONS = {
    "gather": _ms_deform_attn_gather,
    "window": _ms_deform_attn_window,
    "gather_window_vjp": _ms_deform_attn_gather_window_vjp,
    "gather_vjp": _ms_deform_attn_gather_vjp,
    "per_level": _ms_deform_attn_per_level,
    "onehot_matmul": _ms_deform_attn_onehot_matmul,
}


def _sampling_offsets_bias_init(num_heads, num_levels, num_points):
  """detrex radial grid: direction of head h, scaled by (point + 1), same for every level."""
  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(num_heads, dtype=np.float32) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))
    grid = grid * np.arange(1, num_points + 1, dtype=np.float32)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


class MultiScaleDeformableAttention(nn.Module):
  """detrex MultiScaleDeformableAttention (batch first), residual included.

  Returns `identity + output_proj(attention)`, where identity is the query without its
  positional embedding, as detrex does.
  """
  embed_dim: int = 256
  num_heads: int = 8
  num_levels: int = 4
  num_points: int = 4
  dtype: jnp.dtype = jnp.float32
  implementation: str = "auto"             # `ms_deform_attn`'s formulation

  @nn.compact
  def __call__(self, query, query_pos, value, reference_points, spatial_shapes,
               value_valid: Optional[jnp.ndarray] = None):
    """Deformable cross-attention.

    Args:
      query, query_pos: [B, Q, D].
      value: [B, N, D] un-projected values (all levels).
      reference_points: [B, Q, L, 2] (x, y) or [B, Q, L, 4] (cx, cy, w, h), normalised.
      spatial_shapes: static tuple of L (H_l, W_l).
      value_valid: optional [B, N] bool, True = valid value (False: zeroed; detrex's
        `key_padding_mask` is its negation).
    Returns:
      [B, Q, D].
    """
    h, l, p = self.num_heads, self.num_levels, self.num_points
    b, q, _ = query.shape
    n = value.shape[1]
    v = nn.Dense(self.embed_dim, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
                 name="value_proj")(value)
    if value_valid is not None:
      v = jnp.where(value_valid[..., None], v, 0.0)
    v = v.reshape(b, n, h, self.embed_dim // h)
    q_in = query + query_pos
    offsets = nn.Dense(h * l * p * 2, kernel_init=nn.initializers.zeros,
                       bias_init=_sampling_offsets_bias_init(h, l, p), dtype=self.dtype,
                       name="sampling_offsets")(q_in).reshape(b, q, h, l, p, 2)
    logits = nn.Dense(h * l * p, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                      name="attention_weights")(q_in).reshape(b, q, h, l * p)
    acc = island_dtype(self.dtype)
    weights = jax.nn.softmax(logits.astype(acc), axis=-1).reshape(b, q, h, l, p)
    # Sampling locations stay float32 (bf16 resolves only ~0.65 px on a 167-wide level).
    offsets = offsets.astype(acc)
    ref = reference_points.astype(acc)
    if ref.shape[-1] == 2:
      normalizer = jnp.asarray([[w, hh] for hh, w in spatial_shapes], acc)            # [L, 2]
      loc = ref[:, :, None, :, None, :] + exact_divide(offsets, normalizer[None, None, None, :, None, :])
    elif ref.shape[-1] == 4:
      loc = (ref[:, :, None, :, None, :2]
             + offsets / p * ref[:, :, None, :, None, 2:] * 0.5)
    else:
      raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {ref.shape}")
    out = ms_deform_attn(v, spatial_shapes, loc, weights, self.implementation)
    out = nn.Dense(self.embed_dim, kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype,
                   name="output_proj")(out)
    return query + out
