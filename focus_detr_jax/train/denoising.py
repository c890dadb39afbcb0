"""Contrastive denoising (CDN) queries with static shapes (spec §7.3, decisions §2 and §7).

detrex `FOCUS_DETR.prepare_for_cdn` sizes everything from the batch: n_max (largest GT count),
G = (2 * dn_number) // (2 * n_max) groups, pad_size = 2 * n_max * G slots. Here every image has a
fixed capacity of S = 2 * dn_number slots and those numbers are computed per batch group of
`batch_group_size` images (reshape [B] -> [B/g, g]; g = 2 reproduces detrex's per-GPU batch) and
applied as masks.

Slot layout of an image (detrex): slot s holds copy b = s // n_max of GT t = s % n_max (the t-th
valid box of the image); copy 2g is the positive and 2g+1 the negative copy of group g, so group
g spans slots [2 n_max g, 2 n_max (g + 1)). A slot is
  * `dn_active` iff s < pad_size (the slot exists in detrex; it gets the class loss);
  * `dn_valid` iff active and t < n_i (a GT copy was written; otherwise detrex leaves a zero label
    embedding and a zero box input, i.e. an unmasked background query inside its group);
  * `dn_positive` iff valid and b is even.
Slots s >= pad_size do not exist in detrex: they are blocked for every query and see only the
matching queries, so they influence nothing.

Noise (the same for positive and negative copies unless stated):
  * label: with probability 0.5 * label_noise_ratio replaced by a uniform class in [0, C);
  * box: xyxy corners += sign * u * (w/2, h/2, w/2, h/2) * box_noise_scale with u in [0, 1) for
    positives and [1, 2) for negatives, clamped to [0, 1], back to cxcywh, then inverse_sigmoid.
The random numbers come in a `CdnDraws` record, either sampled from a key (`sample_cdn_draws`)
or converted from detrex's recorded draws (`cdn_draws_from_detrex_rows`); `build_cdn_queries` is
the one code path that uses them.

Shape letters: B images, M target slots, S = 2 * dn_number DN slots, Q matching queries, C classes.
"""

from typing import Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.ops.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid


@flax.struct.dataclass
class CdnDraws:
  """Random numbers of the CDN noise, one per slot (values of inactive slots are ignored).

  Attributes:
    label_flip_u: [B, S] float32 in [0, 1); the label is replaced iff < 0.5 * label_noise_ratio.
    new_label: [B, S] int32 in [0, C), the replacement label.
    box_sign01: [B, S, 4] float32 in {0, 1}; sign = 2 * x - 1 per corner coordinate.
    box_u: [B, S, 4] float32 in [0, 1), the noise magnitude before the +1 of negatives.
  """
  label_flip_u: jax.Array
  new_label: jax.Array
  box_sign01: jax.Array
  box_u: jax.Array


@flax.struct.dataclass
class DenoisingQueries:
  """What the model and the criterion need from `build_cdn_queries`.

  Attributes:
    dn_labels: [B, S] int32 noised class of each slot (0 where not `dn_valid`). The model embeds
      it with `label_enc` and must zero the embedding where not `dn_valid` (detrex's zero fill).
    dn_boxes_unact: [B, S, 4] float32 inverse_sigmoid of the noised boxes (0 where not
      `dn_valid`, exactly detrex's `input_query_bbox`); the decoder's reference is its sigmoid.
    dn_boxes: [B, S, 4] float32 noised cxcywh boxes before inverse_sigmoid (0 where not valid).
    dn_attn_mask: [B, S + Q, S + Q] bool decoder self-attention mask, True = blocked
      (row = query, column = key; DN slots first, then the Q matching queries).
    dn_valid: [B, S] bool, the slot holds a (noised) copy of a ground-truth box.
    dn_active: [B, S] bool, the slot exists in detrex (s < pad_size); class loss over these.
    dn_positive: [B, S] bool, valid positive copy (box losses, class target = its GT label).
    dn_target_index: [B, S] int32 index into the M target slots of the copied box (0 if invalid).
    num_groups: [B] int32 G of the image's batch group (0 when the group has no box: no DN).
    group_width: [B] int32 slots per group, 2 * n_max (detrex `dn_meta["single_padding"]`).
    pad_size: [B] int32 2 * n_max * G, the number of active slots.
  """
  dn_labels: jax.Array
  dn_boxes_unact: jax.Array
  dn_boxes: jax.Array
  dn_attn_mask: jax.Array
  dn_valid: jax.Array
  dn_active: jax.Array
  dn_positive: jax.Array
  dn_target_index: jax.Array
  num_groups: jax.Array
  group_width: jax.Array
  pad_size: jax.Array


def sample_cdn_draws(key, batch_size: int, num_slots: int, num_classes: int) -> CdnDraws:
  """Draw the CDN noise from a PRNG key: [B, S] / [B, S, 4] arrays (see `CdnDraws`)."""
  k_flip, k_label, k_sign, k_u = jax.random.split(key, 4)
  return CdnDraws(
      label_flip_u=jax.random.uniform(k_flip, (batch_size, num_slots), jnp.float32),
      new_label=jax.random.randint(k_label, (batch_size, num_slots), 0, num_classes, jnp.int32),
      box_sign01=jax.random.bernoulli(k_sign, 0.5, (batch_size, num_slots, 4)).astype(jnp.float32),
      box_u=jax.random.uniform(k_u, (batch_size, num_slots, 4), jnp.float32))


def cdn_draws_from_detrex_rows(recorded: Mapping[str, np.ndarray], batch_size: int,
                               num_slots: int) -> CdnDraws:
  """Scatter detrex's recorded draws (parity/training_extras.md §2, §5) into our slot grid.

  detrex draws one value per "known row" r = copy * n + j (n = GTs of the batch group, j = GT
  index in the group's concatenation); row r lives in slot `dn_map_known_indice[r]` of image
  `dn_known_bid[r]`. Slots that no row fills keep zeros (they are never used).

  Args:
    recorded: numpy arrays `draw0_label_flip_p` [R], `draw1_label_new_label_dense` [R] (-1 where
      not flipped), `draw2_box_rand_sign01` [R, 4], `draw3_box_rand_part` [R, 4],
      `dn_known_bid` [R], `dn_map_known_indice` [R] of one batch group of `batch_size` images.
    batch_size: images of that group.
    num_slots: S, the slot capacity (2 * dn_number).

  Returns:
    `CdnDraws` of numpy arrays, [B, S] / [B, S, 4].
  """
  image = np.asarray(recorded["dn_known_bid"], np.int64)
  slot = np.asarray(recorded["dn_map_known_indice"], np.int64)
  if slot.size and slot.max() >= num_slots:
    raise ValueError(f"recorded slot {slot.max()} exceeds the capacity {num_slots}")

  def scatter(values, dtype, trailing=()):
    out = np.zeros((batch_size, num_slots) + trailing, dtype)
    out[image, slot] = np.asarray(values).astype(dtype)
    return out

  new_label = np.maximum(np.asarray(recorded["draw1_label_new_label_dense"]), 0)
  return CdnDraws(
      label_flip_u=scatter(recorded["draw0_label_flip_p"], np.float32),
      new_label=scatter(new_label, np.int32),
      box_sign01=scatter(recorded["draw2_box_rand_sign01"], np.float32, (4,)),
      box_u=scatter(recorded["draw3_box_rand_part"], np.float32, (4,)))


def _group_max(values, group_size: int):
  """[B] -> [B]: the maximum over each image's batch group (reshape [B] -> [B/g, g])."""
  grouped = values.reshape(-1, group_size)
  return jnp.repeat(grouped.max(axis=1), group_size)


def dn_attention_mask(dn_active, slot_group, num_queries: int):
  """Decoder self-attention mask of one image: [S] bool, [S] int32 -> [S + Q, S + Q] bool.

  True = blocked. Matching queries never see DN slots; an active DN slot sees the active slots of
  its own group (filled or not) and every matching query; an inactive slot is seen by nobody and
  sees only the matching queries.
  """
  num_slots = dn_active.shape[0]
  same_group = ((slot_group[:, None] == slot_group[None, :])
                & dn_active[:, None] & dn_active[None, :])  # [S, S]
  dn_rows = jnp.concatenate(
      [~same_group, jnp.zeros((num_slots, num_queries), bool)], axis=1)  # [S, S + Q]
  match_rows = jnp.concatenate(
      [jnp.ones((num_queries, num_slots), bool), jnp.zeros((num_queries, num_queries), bool)],
      axis=1)  # [Q, S + Q]
  return jnp.concatenate([dn_rows, match_rows], axis=0)


def build_cdn_queries(target_labels, target_boxes, target_valid, draws: CdnDraws, *,
                      dn_number: int, num_queries: int, label_noise_ratio: float,
                      box_noise_scale: float, batch_group_size: int) -> DenoisingQueries:
  """Contrastive denoising queries of a batch, static shapes (see the module docstring).

  Args:
    target_labels: [B, M] int class ids in [0, C).
    target_boxes: [B, M, 4] float32 normalised cxcywh.
    target_valid: [B, M] bool (valid boxes may sit anywhere; the t-th valid one is GT t).
    draws: `CdnDraws` with [B, S] leading axes, S = 2 * dn_number.
    dn_number: detrex `dn_number` (100); S = 2 * dn_number slots per image.
    num_queries: Q, matching queries after the DN slots (size of the attention mask).
    label_noise_ratio: labels flip with probability 0.5 * label_noise_ratio.
    box_noise_scale: scale of the corner noise (0 disables box noise, as in detrex).
    batch_group_size: images that share n_max, G and the slot layout; must divide B.

  Returns:
    `DenoisingQueries`.
  """
  batch, num_targets = target_labels.shape
  num_slots = 2 * dn_number
  if batch % batch_group_size:
    raise ValueError(f"batch {batch} is not a multiple of batch_group_size {batch_group_size}")
  if num_targets > dn_number:
    # With n_max > dn_number detrex's pad_size (2 n_max) would exceed the capacity.
    raise ValueError(f"{num_targets} target slots exceed dn_number={dn_number}")
  if draws.label_flip_u.shape != (batch, num_slots):
    raise ValueError(f"draws have shape {draws.label_flip_u.shape}, expected {(batch, num_slots)}")

  num_boxes = jnp.sum(target_valid, axis=1).astype(jnp.int32)  # [B] n_i
  n_max = _group_max(num_boxes, batch_group_size)  # [B]
  safe_n_max = jnp.maximum(n_max, 1)
  num_groups = jnp.where(n_max > 0, jnp.maximum(num_slots // (2 * safe_n_max), 1), 0)  # [B] G
  group_width = 2 * n_max
  pad_size = group_width * num_groups  # [B]

  slot = jnp.arange(num_slots, dtype=jnp.int32)[None, :]  # [1, S]
  copy = slot // safe_n_max[:, None]  # [B, S] copy b of the GTs
  gt_rank = slot % safe_n_max[:, None]  # [B, S] t: the t-th valid box of the image
  active = slot < pad_size[:, None]
  valid = active & (gt_rank < num_boxes[:, None])
  negative = (copy % 2) == 1
  positive = valid & ~negative
  slot_group = jnp.where(active, copy // 2, -1)  # [B, S]

  # Index of the t-th valid target: valid slots first, in their original order.
  valid_first = jnp.argsort(~target_valid, axis=1, stable=True).astype(jnp.int32)  # [B, M]
  target_index = jnp.take_along_axis(valid_first, jnp.minimum(gt_rank, num_targets - 1), axis=1)
  target_index = jnp.where(valid, target_index, 0)  # [B, S]
  clean_labels = jnp.take_along_axis(target_labels.astype(jnp.int32), target_index, axis=1)
  clean_boxes = jnp.take_along_axis(
      target_boxes.astype(jnp.float32), target_index[..., None], axis=1)  # [B, S, 4]

  labels = clean_labels
  if label_noise_ratio > 0:
    flip = draws.label_flip_u < label_noise_ratio * 0.5
    labels = jnp.where(flip, draws.new_label.astype(jnp.int32), clean_labels)

  boxes = clean_boxes
  if box_noise_scale > 0:
    # detrex operation order, so that recorded draws reproduce its boxes bitwise.
    corners = box_cxcywh_to_xyxy(clean_boxes)
    half_wh = clean_boxes[..., 2:] / 2
    diff = jnp.concatenate([half_wh, half_wh], axis=-1)  # [B, S, 4]
    sign = draws.box_sign01 * 2.0 - 1.0
    rand_part = (draws.box_u + negative[..., None].astype(jnp.float32)) * sign
    noise = (rand_part * diff) * box_noise_scale
    # An identity select (diff >= 0 always) between the multiply and the add: without it XLA:CPU
    # contracts them into one FMA (one rounding instead of torch's two), which moved ~1 in 8 noised
    # coordinates by an ulp, up to 1.6e-5 after inverse_sigmoid (issue 19, seed-1 set).
    noise = jnp.where(diff >= 0, noise, -noise)
    corners = corners + noise
    boxes = box_xyxy_to_cxcywh(jnp.clip(corners, 0.0, 1.0))

  labels = jnp.where(valid, labels, 0)
  boxes = jnp.where(valid[..., None], boxes, 0.0)
  boxes_unact = jnp.where(valid[..., None], inverse_sigmoid(boxes), 0.0)
  attn_mask = jax.vmap(lambda a, g: dn_attention_mask(a, g, num_queries))(active, slot_group)
  return DenoisingQueries(
      dn_labels=labels, dn_boxes_unact=boxes_unact, dn_boxes=boxes, dn_attn_mask=attn_mask,
      dn_valid=valid, dn_active=active, dn_positive=positive, dn_target_index=target_index,
      num_groups=num_groups.astype(jnp.int32), group_width=group_width.astype(jnp.int32),
      pad_size=pad_size.astype(jnp.int32))
