"""detrex ChannelMapper: 1x1 conv + GroupNorm(32) per input level, plus an extra 3x3/s2 level.

The extra (coarsest, stride-64) level is computed from the raw last backbone output, not from the
projected map (spec §1.3). No activation anywhere.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from focus_detr_jax.models.layers import Conv2d, group_norm


class ConvNorm(nn.Module):
  """Conv2d (with bias, xavier init) followed by GroupNorm (names `conv`, `norm`)."""
  features: int
  kernel_size: int
  stride: int
  padding: int
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Conv2d(self.features, self.kernel_size, self.stride, self.padding, use_bias=True,
               kernel_init=nn.initializers.xavier_uniform(), dtype=self.dtype, name="conv")(x)
    return group_norm(self.num_groups, "norm", self.dtype)(x)


class ChannelMapper(nn.Module):
  """Backbone levels -> `num_outs` maps of `out_channels` channels (finest first)."""
  out_channels: int = 256
  num_outs: int = 4
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]):
    """features: list of [B, H_i, W_i, C_i] -> list of `num_outs` [B, H_l, W_l, out_channels]."""
    outs = [ConvNorm(self.out_channels, 1, 1, 0, self.num_groups, self.dtype,
                     name=f"convs_{i}")(f) for i, f in enumerate(features)]
    for j in range(self.num_outs - len(features)):
      source = features[-1] if j == 0 else outs[-1]
      outs.append(ConvNorm(self.out_channels, 3, 2, 1, self.num_groups, self.dtype,
                           name=f"extra_convs_{j}")(source))
    return outs
