"""detectron2 Swin Transformer backbone (`detectron2/modeling/backbone/swin.py`, as in detrex).

The forward is the one recorded in the parity sets (swin_tiny/README §2), step by step:
  1. PatchEmbed: zero-pad bottom/right to a multiple of 4, conv 4x4/s4, LayerNorm.
  2. Stage i on an H_i x W_i grid with C_i = embed_dim * 2^i channels, blocks alternating shift 0
     (even block) and window // 2 (odd block):
       x = x + drop_path(attn(norm1(x))), x = x + drop_path(mlp(norm2(x))).
     Window padding happens after `norm1`: zero-pad bottom/right to multiples of the window; the
     padded tokens are NOT masked (they are keys/values equal to the qkv bias) and are cropped
     after the attention. Shifted blocks roll the padded map by -shift, attend with the region
     mask (-100, regions of the padded grid only) and roll back. detectron2 keeps the window and
     the shift even when the map is smaller than the window.
  3. PatchMerging after stages 0..2: pad odd H/W by one zero row/column, concatenate (even row,
     even col), (odd row, even col), (even row, odd col), (odd row, odd col), LayerNorm(4C),
     Linear(2C, no bias). H_{i+1} = ceil(H_i / 2).
  4. Output i (in out_indices) is `norm{i}` of the stage output before PatchMerging.

Parameter names follow detectron2 (`patch_embed/proj`, `layers_{i}/blocks_{j}/attn/qkv`,
`layers_{i}/downsample/reduction`, `norm{i}`), so `convert/swin.py` maps keys one to one. The
`relative_position_index` is a numpy constant (not a variable). Every shape-dependent constant
(padding, shift mask) is computed in numpy from the static input shape, so the module jits.

Intermediates (collection `intermediates`, kept only when the caller asks for it), all NHWC:
`patch_embed_out` (after its norm), `stage{i}` (stage output before norm and merging),
`stage{i}_merged` (PatchMerging output = input of stage i+1) and `layers_{i}/block{j}` (output of
block j of stage i).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.models import remat
from focus_detr_jax.models.layers import Conv2d, island_dtype, layer_norm

# Added to the logits of token pairs from different shift regions (detectron2: -100.0, not -inf).
SHIFT_MASK_VALUE = -100.0

_dense_init = nn.initializers.truncated_normal(0.02)  # detectron2 `trunc_normal_(std=.02)`


def _layer_norm(name, dtype):
  return layer_norm(name, dtype)


# ----------------------------------------------------------------------------------------------
# Static helpers (numpy constants and pure reshapes), tested on their own.
# ----------------------------------------------------------------------------------------------


def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] int64: (dy + w-1) * (2w-1) + (dx + w-1), dy = y_i - y_j, dx = x_i - x_j.

  Tokens are row-major inside the window; values lie in [0, (2w-1)^2).
  """
  ys, xs = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  coords = np.stack([ys.ravel(), xs.ravel()])           # [2, w*w]
  rel = coords[:, :, None] - coords[:, None, :]         # [2, w*w, w*w]
  return ((rel[0] + window - 1) * (2 * window - 1) + (rel[1] + window - 1)).astype(np.int64)


def padded_size(size: int, multiple: int) -> int:
  """Smallest multiple of `multiple` >= size (bottom/right zero padding target)."""
  return -(-size // multiple) * multiple


def pad_bottom_right(x, height: int, width: int):
  """Zero-pad x [B, H, W, C] at the bottom/right to [B, height, width, C] (no-op if equal)."""
  _, h, w, _ = x.shape
  if (h, w) == (height, width):
    return x
  return jnp.pad(x, ((0, 0), (0, height - h), (0, width - w), (0, 0)))


def window_partition(x, window: int):
  """[B, Hp, Wp, C] -> [B, nW, w*w, C]; windows row-major, tokens row-major inside a window."""
  b, hp, wp, c = x.shape
  x = x.reshape(b, hp // window, window, wp // window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                      # [B, Hp/w, Wp/w, w, w, C]
  return x.reshape(b, (hp // window) * (wp // window), window * window, c)


def window_reverse(windows, window: int, hp: int, wp: int):
  """Inverse of `window_partition`: [B, nW, w*w, C] -> [B, Hp, Wp, C]."""
  b, _, _, c = windows.shape
  x = windows.reshape(b, hp // window, wp // window, window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)                      # [B, Hp/w, w, Wp/w, w, C]
  return x.reshape(b, hp, wp, c)


def shift_region_ids(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
  """[Hp, Wp] int: the 9 shift regions of the padded grid (slices (0:-w), (-w:-s), (-s:))."""
  img = np.zeros((hp, wp), np.int64)
  cnt = 0
  slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  for hs in slices:
    for ws in slices:
      img[hs, ws] = cnt
      cnt += 1
  return img


def shift_attention_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
  """[nW, w*w, w*w] float32: 0 within a region, -100 between regions (detectron2 BasicLayer).

  Computed on the padded grid; padding is not masked (as detectron2).
  """
  ids = shift_region_ids(hp, wp, window, shift)
  win = window_partition(ids[None, :, :, None], window)[0, :, :, 0]   # [nW, w*w]
  diff = win[:, None, :] - win[:, :, None]
  return np.where(diff != 0, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def patch_merging_concat(x):
  """PatchMerging gather: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 4C].

  Odd H/W get one zero row/column at the bottom/right first. The channel order is detectron2's
  (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col).
  """
  _, h, w, _ = x.shape
  x = pad_bottom_right(x, h + h % 2, w + w % 2)
  return jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                         axis=-1)


def drop_path_rates(drop_path_rate: float, depths: Sequence[int]) -> np.ndarray:
  """Per-block stochastic depth rates, linear from 0 to drop_path_rate over all blocks."""
  return np.linspace(0.0, drop_path_rate, int(sum(depths)))


# ----------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------


class DropPath(nn.Module):
  """timm DropPath: per-sample residual drop at train time (x / keep * bernoulli), 'dropout' rng."""
  rate: float

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x / jnp.asarray(keep, x.dtype) * mask.astype(x.dtype)


class WindowAttention(nn.Module):
  """Window multi-head self-attention with relative position bias (`attn` of a Swin block).

  Attributes:
    dim: channels C.
    num_heads: heads h (head_dim = C / h, qk scale head_dim^-0.5).
    window: window size w.
  """
  dim: int
  num_heads: int
  window: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [B, nW, N, C] windows (N = w*w); mask: optional [nW, N, N] additive -> [B, nW, N, C]."""
    b, nw, n, c = x.shape
    if c != self.dim or n != self.window ** 2:
      raise ValueError(f"WindowAttention expects [B, nW, {self.window ** 2}, {self.dim}], "
                       f"got {x.shape}")
    h, w = self.num_heads, self.window
    hd = c // h
    table = self.param("relative_position_bias_table", _dense_init, ((2 * w - 1) ** 2, h))
    qkv = nn.Dense(3 * c, kernel_init=_dense_init, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, nw, n, 3, h, hd)                # torch: reshape(B_, N, 3, heads, hd)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]   # [B, nW, N, h, hd]
    q = q * jnp.asarray(hd ** -0.5, q.dtype)
    acc = island_dtype(self.dtype)
    logits = jnp.einsum("bwqhd,bwkhd->bwhqk", q, k).astype(acc)          # [B, nW, h, N, N]
    index = relative_position_index(w).reshape(-1)        # numpy constant [N*N]
    bias = jnp.take(table.astype(acc), index, axis=0).reshape(n, n, h).transpose(2, 0, 1)
    logits = logits + bias                               # [h, N, N] broadcast
    if mask is not None:
      logits = logits + jnp.asarray(mask)[None, :, None]  # [1, nW, 1, N, N]
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bwhqk,bwkhd->bwqhd", weights, v).reshape(b, nw, n, c)
    return nn.Dense(c, kernel_init=_dense_init, dtype=self.dtype, name="proj")(out)


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2."""
  hidden_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.hidden_dim, kernel_init=_dense_init, dtype=self.dtype, name="fc1")(x)
    y = nn.gelu(y, approximate=False)
    return nn.Dense(x.shape[-1], kernel_init=_dense_init, dtype=self.dtype, name="fc2")(y)


class SwinBlock(nn.Module):
  """One Swin block (W-MSA if shift == 0, SW-MSA otherwise) + MLP, pre-norm with residuals.

  Attributes:
    num_heads, window, shift: attention heads, window size, cyclic shift (0 or window // 2).
    mlp_ratio: MLP hidden = mlp_ratio * C.
    drop_path: stochastic depth rate of this block.
  """
  num_heads: int
  window: int
  shift: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    """x: [B, H, W, C]; mask: [nW, N, N] of the padded grid (used iff shift > 0) -> [B, H, W, C]."""
    _, hgt, wid, c = x.shape
    w, s = self.window, self.shift
    hp, wp = padded_size(hgt, w), padded_size(wid, w)
    drop = DropPath(self.drop_path)
    y = _layer_norm("norm1", self.dtype)(x)
    y = pad_bottom_right(y, hp, wp)                      # [B, Hp, Wp, C], zeros not masked
    if s > 0:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
    y = window_partition(y, w)                           # [B, nW, w*w, C]
    y = WindowAttention(c, self.num_heads, w, dtype=self.dtype, name="attn")(
        y, mask if s > 0 else None)
    y = window_reverse(y, w, hp, wp)                     # [B, Hp, Wp, C]
    if s > 0:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    y = y[:, :hgt, :wid]
    x = x + drop(y, train)
    y = Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")(
        _layer_norm("norm2", self.dtype)(x))
    return x + drop(y, train)


class PatchMerging(nn.Module):
  """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: 2x2 gather (detectron2 order), norm, Linear."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    x = patch_merging_concat(x)                          # [B, H/2, W/2, 4C]
    x = _layer_norm("norm", self.dtype)(x)
    return nn.Dense(2 * c, use_bias=False, kernel_init=_dense_init, dtype=self.dtype,
                    name="reduction")(x)


class SwinStage(nn.Module):
  """detectron2 BasicLayer: `depth` blocks (shift 0 / w//2 alternating) and optional PatchMerging.

  Returns (stage output before merging [B, H, W, C], merged [B, H/2, W/2, 2C] or None).
  """
  depth: int
  num_heads: int
  window: int
  mlp_ratio: float
  drop_paths: Sequence[float]
  downsample: bool
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"                      # models/remat.py ("full" rematerialises each block)

  @nn.compact
  def __call__(self, x, train: bool = False):
    _, hgt, wid, _ = x.shape
    block = remat.wrap(SwinBlock, self.remat, "backbone", static_argnums=(3,))
    w, s = self.window, self.window // 2
    mask = shift_attention_mask(padded_size(hgt, w), padded_size(wid, w), w, s)  # numpy constant
    for j in range(self.depth):
      x = block(self.num_heads, w, 0 if j % 2 == 0 else s, self.mlp_ratio,
                    float(self.drop_paths[j]), dtype=self.dtype, name=f"blocks_{j}")(x, mask, train)
      self.sow("intermediates", f"block{j}", x)
    merged = PatchMerging(dtype=self.dtype, name="downsample")(x) if self.downsample else None
    return x, merged


class PatchEmbed(nn.Module):
  """Conv p x p / stride p (with bias) then LayerNorm (`patch_embed/proj`, `patch_embed/norm`)."""
  embed_dim: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, 3] with H, W multiples of patch_size -> [B, H/p, W/p, embed_dim]."""
    p = self.patch_size
    x = Conv2d(self.embed_dim, p, p, 0, use_bias=True, dtype=self.dtype,
               kernel_init=nn.initializers.lecun_normal(), name="proj")(x)
    return _layer_norm("norm", self.dtype)(x)


class SwinTransformer(nn.Module):
  """detectron2 SwinTransformer (no absolute position embedding, patch_norm, qkv bias).

  Attributes:
    embed_dim: C of stage 0 (T 96, B 128, L 192).
    depths: blocks per stage (T (2,2,6,2), B/L (2,2,18,2)).
    num_heads: heads per stage (T (3,6,12,24), B (4,8,16,32), L (6,12,24,48)).
    window_size: attention window (T 7, B/L 12); shift = window_size // 2.
    mlp_ratio: MLP hidden ratio.
    drop_path_rate: stochastic depth, linear over all blocks (T 0.1, B/L 0.2, decisions §5).
    out_indices: stages returned, each after its LayerNorm `norm{i}`.
    dtype: compute dtype (params stay float32; softmax logits are float32).
    patch_size: PatchEmbed stride (4).
  """
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.1
  out_indices: Sequence[int] = (1, 2, 3)
  dtype: jnp.dtype = jnp.float32
  patch_size: int = 4
  remat: str = "none"

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: [B, H, W, 3] normalised (any H, W) -> [p_i for i in out_indices], each
    [B, H_i, W_i, embed_dim * 2^i] with stride 4 * 2^i (H_i = ceil(H / stride))."""
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
    p = self.patch_size
    _, hgt, wid, _ = images.shape
    x = pad_bottom_right(images.astype(self.dtype), padded_size(hgt, p), padded_size(wid, p))
    x = PatchEmbed(self.embed_dim, p, dtype=self.dtype, name="patch_embed")(x)
    self.sow("intermediates", "patch_embed_out", x)
    rates = drop_path_rates(self.drop_path_rate, self.depths)
    outputs = []
    num_stages = len(self.depths)
    for i in range(num_stages):
      start = int(sum(self.depths[:i]))
      stage_out, merged = SwinStage(
          self.depths[i], self.num_heads[i], self.window_size, self.mlp_ratio,
          tuple(float(r) for r in rates[start:start + self.depths[i]]),
          downsample=i < num_stages - 1, dtype=self.dtype, remat=self.remat,
          name=f"layers_{i}")(x, train)
      self.sow("intermediates", f"stage{i}", stage_out)
      if i in self.out_indices:
        outputs.append(_layer_norm(f"norm{i}", self.dtype)(stage_out))
      if merged is not None:
        self.sow("intermediates", f"stage{i}_merged", merged)
        x = merged
    return outputs
