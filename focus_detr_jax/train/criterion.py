"""Focus-DETR training objective: the 40 detrex loss terms and their weighted sum (spec §8).

detrex `FOCUS_DETRCriterion` (= `TwoStageCriterion` + DN losses, projects/focus_detr/modeling):
  * final decoder layer, aux layers `_0.._{L-2}` and the two-stage output `_enc` (class-aware):
    each Hungarian-matched independently; sigmoid focal class loss over all queries x classes
    (detrex `loss.mean(1).sum() / num_boxes * Q`, i.e. the sum / num_boxes), L1 and 1 - GIoU on
    the matched pairs / num_boxes;
  * denoising `_dn`, `_dn_0..`: fixed matching (the positive copies), focal over every active DN
    slot (negatives and unfilled slots are background), box losses on positives, all divided by
    num_boxes * G of the image's batch group (decisions §7); zeros when DN is off;
  * `select_loss` of the Foreground Token Selector (foreground.py).
Weights: class 1, bbox 5, giou 2 for every variant, select 1.5.

`num_boxes` is the number of valid targets in the global batch, clamped to >= 1: the caller
computes it (and later psums it across devices).

Shape letters: B images, Q queries, Qe two-stage proposals, C classes, M target slots, L decoder
layers, S DN slots, N tokens.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from focus_detr_jax.ops.boxes import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from focus_detr_jax.train import foreground
from focus_detr_jax.train.denoising import DenoisingQueries
from focus_detr_jax.train.matcher import Matching, MatcherConfig, match, sanitize_targets

@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static loss settings (hashable, so it can be a jit static argument)."""
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  class_weight: float = 1.0
  bbox_weight: float = 5.0
  giou_weight: float = 2.0
  select_weight: float = 1.5
  matcher: MatcherConfig = MatcherConfig()
  fg_strides: Tuple[int, ...] = foreground.DEFAULT_STRIDES
  fg_ranges: Tuple[Tuple[float, float], ...] = foreground.DEFAULT_RANGES

  @classmethod
  def from_config(cls, config) -> "LossConfig":
    """From the full config (`config.loss` of configs/common.py)."""
    loss = config.loss
    return cls(focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma,
               class_weight=loss.class_weight, bbox_weight=loss.bbox_weight,
               giou_weight=loss.giou_weight, select_weight=loss.select_weight,
               matcher=MatcherConfig.from_config(loss),
               fg_strides=tuple(loss.fg_strides),
               fg_ranges=tuple(tuple(r) for r in loss.fg_ranges))

  def weight(self, name: str) -> float:
    """detrex weight_dict value of a loss key."""
    if name == "select_loss":
      return self.select_weight
    kind = name.split("_")[1]  # loss_{class,bbox,giou}[_suffix]
    return {"class": self.class_weight, "bbox": self.bbox_weight, "giou": self.giou_weight}[kind]


def loss_names(num_aux_layers: int = 5) -> Tuple[str, ...]:
  """The loss keys in detrex's DN-off dict order (`loss_names` of losses_train.npz): 40 for 5."""
  names = ["loss_class", "loss_bbox", "loss_giou", "select_loss"]
  for i in range(num_aux_layers):
    names += [f"loss_class_{i}", f"loss_bbox_{i}", f"loss_giou_{i}"]
  names += ["loss_class_enc", "loss_bbox_enc", "loss_giou_enc"]
  names += ["loss_bbox_dn", "loss_giou_dn", "loss_class_dn"]
  for i in range(num_aux_layers):
    names += [f"loss_bbox_dn_{i}", f"loss_giou_dn_{i}", f"loss_class_dn_{i}"]
  return tuple(names)


def _box_losses(pred_boxes, target_boxes):
  """L1 and 1 - GIoU of box pairs: [..., 4] (cast to float32), [..., 4] -> [...], [...]."""
  pred_boxes = pred_boxes.astype(jnp.float32)
  giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes),
                                         box_cxcywh_to_xyxy(target_boxes))
  return jnp.abs(pred_boxes - target_boxes).sum(-1), 1.0 - giou


def matched_losses(pred_logits, pred_boxes, target_labels, target_boxes, matching: Matching,
                   num_boxes, config: LossConfig = LossConfig()) -> Dict[str, jax.Array]:
  """Class, L1 and GIoU losses of one output head given its matching (detrex `SetCriterion`).

  Args:
    pred_logits: [B, Q, C].
    pred_boxes: [B, Q, 4] normalised cxcywh.
    target_labels: [B, M] int32 (sanitised: valid in [0, C)).
    target_boxes: [B, M, 4] normalised cxcywh (sanitised: no NaN in padded slots).
    matching: `Matching` with [B, M] fields.
    num_boxes: scalar float, valid targets of the global batch (>= 1).

  Returns:
    {"loss_class", "loss_bbox", "loss_giou"}: scalars float32.
  """
  batch, num_queries, num_classes = pred_logits.shape
  weight = matching.matched.astype(jnp.float32)  # [B, M]
  batch_index = jnp.arange(batch)[:, None]
  # One-hot class target of every query; unmatched queries are background (all zeros).
  onehot = jnp.zeros((batch, num_queries, num_classes), jnp.float32)
  onehot = onehot.at[batch_index, matching.query_index, target_labels].max(weight)
  focal = foreground.sigmoid_focal_loss(pred_logits, onehot, config.focal_alpha, config.focal_gamma)
  matched_boxes = jnp.take_along_axis(
      pred_boxes.astype(jnp.float32), matching.query_index[..., None], axis=1)  # [B, M, 4]
  l1, giou = _box_losses(matched_boxes, target_boxes)
  return {"loss_class": jnp.sum(focal) / num_boxes,
          "loss_bbox": jnp.sum(l1 * weight) / num_boxes,
          "loss_giou": jnp.sum(giou * weight) / num_boxes}


def denoising_losses(dn_logits, dn_boxes, target_labels, target_boxes, dn: DenoisingQueries,
                     num_boxes, config: LossConfig = LossConfig()) -> Dict[str, jax.Array]:
  """DN class, L1 and GIoU losses of one decoder layer (detrex `compute_dn_loss`).

  Each image's sums are divided by num_boxes * G of its batch group; images of groups without
  boxes (G = 0) contribute nothing.

  Args:
    dn_logits: [B, S, C] class logits of the DN slots.
    dn_boxes: [B, S, 4] boxes of the DN slots, normalised cxcywh.
    target_labels, target_boxes: [B, M], [B, M, 4] sanitised targets (clean labels and boxes).
    dn: the `DenoisingQueries` the decoder was run with.
    num_boxes: scalar float (>= 1).

  Returns:
    {"loss_class", "loss_bbox", "loss_giou"}: scalars float32.
  """
  num_classes = dn_logits.shape[-1]
  positive = dn.dn_positive.astype(jnp.float32)  # [B, S]
  slot_labels = jnp.take_along_axis(target_labels, dn.dn_target_index, axis=1)  # [B, S]
  onehot = jax.nn.one_hot(slot_labels, num_classes, dtype=jnp.float32) * positive[..., None]
  focal = foreground.sigmoid_focal_loss(dn_logits, onehot, config.focal_alpha, config.focal_gamma)
  focal = jnp.sum(focal, axis=-1) * dn.dn_active  # [B, S]: inactive slots do not exist in detrex
  slot_boxes = jnp.take_along_axis(target_boxes, dn.dn_target_index[..., None], axis=1)
  l1, giou = _box_losses(dn_boxes, slot_boxes)  # [B, S]
  norm = num_boxes * dn.num_groups.astype(jnp.float32)  # [B]
  inv_norm = jnp.where(dn.num_groups > 0, 1.0 / jnp.maximum(norm, 1.0), 0.0)
  per_image = lambda x: jnp.sum(jnp.sum(x, axis=1) * inv_norm)
  return {"loss_class": per_image(focal),
          "loss_bbox": per_image(l1 * positive),
          "loss_giou": per_image(giou * positive)}


def _targets(targets: Mapping[str, jax.Array]):
  valid = targets["box_valid"].astype(bool)
  labels, boxes = sanitize_targets(targets["labels"], targets["boxes"], valid)
  return labels, boxes, valid


def compute_matchings(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                      config: LossConfig = LossConfig()) -> Matching:
  """All Hungarian matchings of one step, stacked [L + 1, B, M]: final, aux 0..L-2, enc.

  One vmapped solver call when Q == Qe (detrex: two_stage_num_proposals = num_queries).
  """
  labels, boxes, valid = _targets(targets)
  logits = jnp.concatenate([outputs["pred_logits"][None], outputs["aux_pred_logits"]], axis=0)
  pboxes = jnp.concatenate([outputs["pred_boxes"][None], outputs["aux_pred_boxes"]], axis=0)
  enc_logits, enc_boxes = outputs["enc_pred_logits"], outputs["enc_pred_boxes"]
  if enc_logits.shape == logits.shape[1:]:
    logits = jnp.concatenate([logits, enc_logits[None]], axis=0)
    pboxes = jnp.concatenate([pboxes, enc_boxes[None]], axis=0)
    return match(logits, pboxes, labels, boxes, valid, config.matcher)
  decoder = match(logits, pboxes, labels, boxes, valid, config.matcher)
  enc = match(enc_logits[None], enc_boxes[None], labels, boxes, valid, config.matcher)
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), decoder, enc)


def focus_detr_loss(outputs: Mapping[str, jax.Array], targets: Mapping[str, jax.Array],
                    num_boxes, *, level_shapes: Sequence[Tuple[int, int]],
                    config: LossConfig = LossConfig(),
                    dn: Optional[DenoisingQueries] = None) -> Tuple[jax.Array, Dict[str, Any]]:
  """The Focus-DETR training loss (detrex `FOCUS_DETRCriterion` + weight_dict).

  Args:
    outputs: model outputs
      `pred_logits` [B, Q, C], `pred_boxes` [B, Q, 4] (final decoder layer),
      `aux_pred_logits` [L-1, B, Q, C], `aux_pred_boxes` [L-1, B, Q, 4] (layers 0..L-2),
      `enc_pred_logits` [B, Qe, C], `enc_pred_boxes` [B, Qe, 4] (two-stage proposals),
      `fg_score` [B, N] (selector logits before masking, levels finest first),
      and with DN `dn_pred_logits` [L, B, S, C], `dn_pred_boxes` [L, B, S, 4] (layers 0..L-1).
      Boxes are normalised cxcywh.
    targets: `boxes` [B, M, 4] normalised cxcywh, `labels` [B, M] int, `box_valid` [B, M] bool,
      `image_size` [B, 2] int (h, w) of the unpadded image.
    num_boxes: scalar, valid targets of the global batch; clamped to >= 1 here.
    level_shapes: static ((H_l, W_l), ...) of the padded feature levels (foreground labels).
    config: `LossConfig`.
    dn: the `DenoisingQueries` of this step, or None when DN is off (DN terms are 0).

  Returns:
    (total, aux): total = sum of weight * loss over the 40 terms (float32 scalar); aux has
    `losses` (raw terms, keys of `loss_names`), `weighted` (weight * raw), `matching`
    (`Matching` [L + 1, B, M]: final, aux 0..L-2, enc), `num_nonfinite_costs` (int32 scalar)
    and `fg_labels` [B, N] int32.
  """
  num_boxes = jnp.maximum(jnp.asarray(num_boxes, jnp.float32), 1.0)
  labels, boxes, _ = _targets(targets)
  num_aux = outputs["aux_pred_logits"].shape[0]
  with jax.named_scope("matcher"):
    matching = compute_matchings(outputs, targets, config)

  losses = {}
  heads = ([("", outputs["pred_logits"], outputs["pred_boxes"])]
           + [(f"_{i}", outputs["aux_pred_logits"][i], outputs["aux_pred_boxes"][i])
              for i in range(num_aux)]
           + [("_enc", outputs["enc_pred_logits"], outputs["enc_pred_boxes"])])
  for k, (suffix, logits, pboxes) in enumerate(heads):
    head_matching = jax.tree.map(lambda x: x[k], matching)
    for name, value in matched_losses(logits, pboxes, labels, boxes, head_matching, num_boxes,
                                      config).items():
      losses[name + suffix] = value

  fg_labels = foreground.foreground_labels(
      targets["boxes"], targets["box_valid"].astype(bool), targets["image_size"], level_shapes,
      config.fg_strides, config.fg_ranges)
  if fg_labels.shape != outputs["fg_score"].shape:
    raise ValueError(f"level_shapes give {fg_labels.shape[1]} tokens, fg_score has "
                     f"{outputs['fg_score'].shape}")
  losses["select_loss"] = foreground.select_loss(outputs["fg_score"], fg_labels,
                                                 config.focal_alpha, config.focal_gamma)

  dn_suffixes = [f"_dn_{i}" for i in range(num_aux)] + ["_dn"]  # DN layers 0..L-1
  for layer, suffix in enumerate(dn_suffixes):
    if dn is None:
      layer_losses = {n: jnp.zeros((), jnp.float32)
                      for n in ("loss_class", "loss_bbox", "loss_giou")}
    else:
      layer_losses = denoising_losses(outputs["dn_pred_logits"][layer],
                                      outputs["dn_pred_boxes"][layer], labels, boxes, dn,
                                      num_boxes, config)
    for name, value in layer_losses.items():
      losses[name + suffix] = value

  losses = {name: losses[name] for name in loss_names(num_aux)}
  weighted = {name: config.weight(name) * value for name, value in losses.items()}
  total = sum(weighted.values())
  aux = {"losses": losses, "weighted": weighted, "matching": matching,
         "num_nonfinite_costs": jnp.sum(matching.num_nonfinite), "fg_labels": fg_labels}
  return total, aux
