"""The settings and sublayers the encoder and decoder layers share, and the DINO decoder layer
(post-norm: self-attn, norm, deformable cross-attn, norm, FFN, norm)."""

import flax.linen as nn
import jax.numpy as jnp

from focus_detr_jax.models.deformable_attention import MultiScaleDeformableAttention
from focus_detr_jax.models.layers import FFN, MultiheadAttention, layer_norm


class TransformerLayer(nn.Module):
  """Fields and sublayer constructors of `DecoderLayer` and `encoder.FocusEncoderLayer`."""
  embed_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  num_levels: int = 4
  num_points: int = 4
  dtype: jnp.dtype = jnp.float32
  msda_implementation: str = "auto"

  def self_attention(self, name):
    return MultiheadAttention(self.embed_dim, self.num_heads, self.dtype, name=name)

  def deformable_attention(self, name):
    return MultiScaleDeformableAttention(self.embed_dim, self.num_heads, self.num_levels,
                                         self.num_points, self.dtype, self.msda_implementation,
                                         name=name)

  def ffn(self, name):
    return FFN(self.embed_dim, self.ffn_dim, self.dtype, name=name)


class DecoderLayer(TransformerLayer):
  """One DINO decoder layer (detrex `DeformableDetrTransformerDecoder` layer)."""

  @nn.compact
  def __call__(self, x, query_pos, memory, memory_valid, reference_points, spatial_shapes,
               attn_mask=None):
    """Decode one layer.

    Args:
      x, query_pos: [B, Q, D] (Q includes the denoising slots when present).
      memory: [B, N, D]; memory_valid: [B, N] bool (True = valid) or None.
      reference_points: [B, Q, L, 4] cxcywh scaled by the valid ratios.
      attn_mask: optional [B, Q, Q] bool, True = blocked (denoising groups).
    Returns:
      [B, Q, D] (before the decoder's final norm).
    """
    qk = x + query_pos
    x = layer_norm("norms_0", self.dtype)(
        x + self.self_attention("attentions_0")(qk, qk, x, attn_mask=attn_mask))
    x = layer_norm("norms_1", self.dtype)(self.deformable_attention("attentions_1")(
        x, query_pos, memory, reference_points, spatial_shapes, memory_valid))
    return layer_norm("norms_2", self.dtype)(x + self.ffn("ffns_0")(x))
