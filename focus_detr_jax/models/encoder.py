"""Focus-DETR dual-attention encoder layer (detrex `Focus_DETR_BaseTransformerLayer`).

Per layer l, on the K_l gathered foreground tokens (static capacity, dynamic count as a mask):
  (a) OESM: the multi-category score max_c(class_embed[6](q)) * fg picks `topk_sa` object tokens,
      which run self-attention (no mask, as detrex) + norm2 and are scattered back;
  (b) deformable attention of every gathered token over the ORIGINAL neck tokens (value never
      updates in detrex), + norms_0;
  (c) FFN + norms_1.
The caller scatters the first min(focus_token_nums[b], K_l) rows back into the memory.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from focus_detr_jax.models.decoder import TransformerLayer
from focus_detr_jax.models.layers import gather_rows, island_dtype, layer_norm, scatter_rows


def select_object_tokens(mc_score, candidate_valid, token_valid, topk_sa, forced_local=None):
  """OESM top-k with detrex semantics and a safe shrink.

  Args:
    mc_score: [B, K] float32 multi-category scores of the gathered tokens.
    candidate_valid: [B, K] bool, row < K_l (rows detrex processes).
    token_valid: [B, K] bool, the gathered token is not padding.
    topk_sa: detrex's fixed object-token count.
    forced_local: optional [B, S] int indices into the K rows (teacher forcing).
  Returns:
    sel [B, S] int32 local indices (sorted by decreasing score), sel_valid [B, S] bool.
  While K_l >= topk_sa this is exactly detrex (padded candidates allowed, as detrex). Where detrex
  crashes (K_l < topk_sa), the selection shrinks to the valid, non-padded candidates.
  """
  k = mc_score.shape[1]
  s = min(topk_sa, k)
  num_candidates = candidate_valid.sum(axis=1)                           # [B] = K_l
  shrink = num_candidates < topk_sa
  allowed = jnp.where(shrink[:, None], candidate_valid & token_valid, candidate_valid)
  key = jnp.where(allowed, mc_score, -jnp.inf)
  if forced_local is None:
    _, sel = jax.lax.top_k(key, s)
  else:
    sel = forced_local.astype(jnp.int32)
  num_selected = jnp.minimum(allowed.sum(axis=1), topk_sa)
  sel_valid = jnp.arange(s)[None, :] < num_selected[:, None]
  return sel.astype(jnp.int32), sel_valid


class FocusEncoderLayer(TransformerLayer):
  """One dual-attention encoder layer on gathered tokens."""
  topk_sa: int = 300

  @nn.compact
  def __call__(self, query, query_pos, reference_points, fg_score, candidate_valid, token_valid,
               value, value_valid, spatial_shapes, class_head, forced_sel_local=None):
    """Update K gathered tokens.

    Args:
      query, query_pos: [B, K, D] gathered tokens and their position (+ level) embeddings.
      reference_points: [B, K, L, 2].
      fg_score: [B, K] float32 gathered (padding-filled) foreground logits.
      candidate_valid: [B, K] bool rows < K_l; token_valid: [B, K] bool non-padded tokens.
      value: [B, N, D] original neck tokens; value_valid: [B, N] bool (True = valid) or None.
      class_head: the shared class_embed[6] (MCSP), a callable [.., D] -> [.., C].
      forced_sel_local: optional [B, S] teacher-forced OESM indices.
    Returns:
      updated query [B, K, D] and a dict of selection intermediates.
    """
    class_logits = class_head(query).astype(island_dtype(self.dtype))      # [B, K, C]
    score_max = class_logits.max(axis=-1)
    mc_score = score_max * fg_score                                          # product of raw logits
    sel, sel_valid = select_object_tokens(mc_score, candidate_valid, token_valid, self.topk_sa,
                                          forced_sel_local)
    tokens = gather_rows(query, sel)
    tokens_pos = gather_rows(query_pos, sel)
    qk = tokens + tokens_pos
    # detrex passes no mask; sel_valid only differs from all-True where detrex would crash.
    attended = self.self_attention("attentions_0")(qk, qk, tokens, key_valid=sel_valid)
    updated = layer_norm("norm2", self.dtype)(tokens + attended)
    updated = jnp.where(sel_valid[..., None], updated, tokens)
    query = scatter_rows(query, sel, updated)

    query = self.deformable_attention("attentions_1")(
        query, query_pos, value, reference_points, spatial_shapes, value_valid)
    query = layer_norm("norms_0", self.dtype)(query)
    query = layer_norm("norms_1", self.dtype)(query + self.ffn("ffns_0")(query))
    info = dict(mc_score=mc_score, score_max=score_max,
                score_argmax=jnp.argmax(class_logits, axis=-1), sel_local=sel, sel_valid=sel_valid)
    return query, info
