"""detectron2 ResNet (torchvision style: stride in the 3x3) with frozen batch norm.

Parameter names follow detectron2 (`stem_conv1`, `res{2..5}_{i}/conv{1,2,3}`, `shortcut`), so the
converter maps `backbone.res3.0.conv2.weight` -> `backbone/res3_0/conv2/kernel` directly.
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from focus_detr_jax.models import remat
from focus_detr_jax.models.layers import Conv2d, FrozenBatchNorm, group_norm, island_dtype

# Bottleneck blocks per stage; 26 is a light variant for CPU demos and tests.
RESNET_BLOCKS = {26: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _norm(kind, name):
  if kind == "frozen_bn":
    return FrozenBatchNorm(name=name)
  if kind == "group_norm":
    return _GroupNorm32(name=name)
  raise ValueError(f"unknown backbone norm {kind!r}; expected 'frozen_bn' or 'group_norm'")


class _GroupNorm32(nn.Module):
  """GroupNorm with 32 groups, or as many as the channels allow for narrow test networks."""

  @nn.compact
  def __call__(self, x):
    groups = math.gcd(32, x.shape[-1])
    # Normalised in float32 under bf16 compute, in float64 in the float64 numerics mode.
    return group_norm(groups, "norm", dtype=island_dtype(x.dtype))(x)


class Bottleneck(nn.Module):
  """1x1 -> 3x3(stride) -> 1x1 bottleneck with projection shortcut in the first block."""
  bottleneck_channels: int
  out_channels: int
  stride: int
  norm: str
  frozen: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda f, k, s, p, name: Conv2d(f, k, s, p, frozen=self.frozen, dtype=self.dtype,
                                           name=name)
    if x.shape[-1] != self.out_channels:
      shortcut = _norm(self.norm, "shortcut_norm")(conv(self.out_channels, 1, self.stride, 0,
                                                        "shortcut")(x))
    else:
      shortcut = x
    y = nn.relu(_norm(self.norm, "conv1_norm")(conv(self.bottleneck_channels, 1, 1, 0, "conv1")(x)))
    y = nn.relu(_norm(self.norm, "conv2_norm")(
        conv(self.bottleneck_channels, 3, self.stride, 1, "conv2")(y)))
    y = _norm(self.norm, "conv3_norm")(conv(self.out_channels, 1, 1, 0, "conv3")(y))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """ResNet-50/101 returning res3, res4, res5 (strides 8/16/32).

  Attributes:
    depth: 50 or 101.
    norm: "frozen_bn" (official weights) or "group_norm" (training from scratch).
    freeze_at: detectron2 semantics: 1 freezes the stem, 2 also res2, ...
    base_width: stem width (64 for the real networks; smaller for tiny test configs).
  """
  depth: int = 50
  norm: str = "frozen_bn"
  freeze_at: int = 1
  base_width: int = 64
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"                      # models/remat.py ("full" rematerialises each block)

  @nn.compact
  def __call__(self, images, train: bool = False):
    """images: [B, H, W, 3] normalised -> [res3, res4, res5], each [B, H_s, W_s, C_s]."""
    if self.depth not in RESNET_BLOCKS:
      raise ValueError(f"ResNet depth {self.depth} not supported; choose from {list(RESNET_BLOCKS)}")
    w = self.base_width
    x = Conv2d(w, 7, 2, 3, frozen=self.freeze_at >= 1, dtype=self.dtype, name="stem_conv1")(images)
    x = nn.relu(_norm(self.norm, "stem_conv1_norm")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    outputs = []
    block = remat.wrap(Bottleneck, self.remat, "backbone")
    for stage, num_blocks in enumerate(RESNET_BLOCKS[self.depth]):
      stage_name = f"res{stage + 2}"
      bottleneck, out = w * 2 ** stage, w * 4 * 2 ** stage
      for i in range(num_blocks):
        x = block(bottleneck, out, 2 if (i == 0 and stage > 0) else 1, self.norm,
                       frozen=self.freeze_at >= stage + 2, dtype=self.dtype,
                       name=f"{stage_name}_{i}")(x)
      if stage >= 1:
        outputs.append(x)
    return outputs
