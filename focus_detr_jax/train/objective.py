"""The training objective: denoising queries + model forward + the detrex criterion.

`model_loss` is the one function that the train step, the parity checks and the gradient
comparison call, so they all differentiate the same thing.
"""

import dataclasses
from typing import Any, Dict, Optional

import jax

from focus_detr_jax.models import remat
from focus_detr_jax.models.focus_detr import feature_level_shapes
from focus_detr_jax.train.criterion import LossConfig, focus_detr_loss
from focus_detr_jax.train.denoising import CdnDraws, build_cdn_queries, sample_cdn_draws


@dataclasses.dataclass(frozen=True)
class DenoisingConfig:
  """Contrastive denoising settings (of `config.model`), hashable."""
  dn_number: int
  num_queries: int
  num_classes: int
  label_noise_ratio: float
  box_noise_scale: float
  batch_group_size: int

  @classmethod
  def from_config(cls, model_config) -> "DenoisingConfig":
    return cls(**{f.name: model_config[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class Objective:
  """Everything of the config the objective reads, parsed once (a static jit argument)."""
  loss: LossConfig
  denoising: DenoisingConfig

  @classmethod
  def from_config(cls, config) -> "Objective":
    return cls(LossConfig.from_config(config), DenoisingConfig.from_config(config.model))


def denoising_queries(dn: DenoisingConfig, batch, key=None, draws: Optional[CdnDraws] = None):
  """CDN queries of a batch from a PRNG key (training) or from given draws (parity)."""
  if dn.dn_number <= 0:
    return None
  b = batch["labels"].shape[0]
  if draws is None:
    if key is None:
      raise ValueError("denoising needs a PRNG key or given draws")
    draws = sample_cdn_draws(key, b, 2 * dn.dn_number, dn.num_classes)
  return build_cdn_queries(
      batch["labels"], batch["boxes"], batch["box_valid"], draws, dn_number=dn.dn_number,
      num_queries=dn.num_queries, label_noise_ratio=dn.label_noise_ratio,
      box_noise_scale=dn.box_noise_scale, batch_group_size=dn.batch_group_size)


def model_loss(model, params, extra_variables, batch, objective: Objective, *, key=None,
               dn_draws: Optional[CdnDraws] = None, forced: Optional[Dict[str, Any]] = None,
               num_boxes=None):
  """Total weighted loss of one batch and its parts.

  Args:
    model: FocusDETR; params: the trainable `params` tree; extra_variables: other collections
      (`frozen` FrozenBN statistics), may be empty.
    objective: the loss and denoising settings (`Objective.from_config(config)`).
    batch: `image` [B,H,W,3], `pixel_valid` [B,H,W] (True = image pixel), `boxes` [B,M,4]
      cxcywh, `labels` [B,M], `box_valid` [B,M], `image_size` [B,2].
    key: PRNG key for the denoising noise and drop path (training).
    dn_draws: given denoising draws (parity); overrides the key for the noise.
    forced: teacher-forced top-k indices (parity).
    num_boxes: valid targets of the global batch (default: of this batch).
  Returns:
    (total, aux) as `focus_detr_loss`, aux also holding `outputs` and `denoising`.
  """
  dn_key = drop_key = None
  if key is not None:
    dn_key, drop_key = jax.random.split(key)
  with jax.named_scope("denoising"):
    dn = denoising_queries(objective.denoising, batch, dn_key, dn_draws)
  denoising = None
  if dn is not None:
    denoising = dict(labels=dn.dn_labels, boxes_unact=dn.dn_boxes_unact,
                     attn_mask=dn.dn_attn_mask, valid=dn.dn_valid)
  rngs = {"dropout": drop_key} if drop_key is not None else {}
  model = remat.for_batch(model, batch["image"].shape)   # model.remat="auto": per canvas
  outputs = model.apply({"params": params, **extra_variables}, batch["image"],
                        batch["pixel_valid"], train=True, denoising=denoising, forced=forced,
                        rngs=rngs)
  targets = dict(boxes=batch["boxes"], labels=batch["labels"], box_valid=batch["box_valid"],
                 image_size=batch["image_size"])
  if num_boxes is None:
    num_boxes = batch["box_valid"].sum()
  level_shapes = feature_level_shapes(*batch["image"].shape[1:3], model.num_levels)
  with jax.named_scope("losses"):  # profiles attribute the criterion's ops to this scope
    total, aux = focus_detr_loss(outputs, targets, num_boxes, level_shapes=level_shapes,
                                 config=objective.loss, dn=dn)
  aux = dict(aux, outputs=outputs, denoising=dn)
  return total, aux
