"""Box utilities shared by the model, the losses and the evaluation.

Boxes are float arrays with the coordinates in the last axis: `cxcywh` (normalised centre/size,
what the model predicts) or `xyxy` (corners).
"""

import jax.numpy as jnp


def box_cxcywh_to_xyxy(boxes):
  """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
  cx, cy, w, h = jnp.split(boxes, 4, axis=-1)
  return jnp.concatenate([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes):
  """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
  x0, y0, x1, y1 = jnp.split(boxes, 4, axis=-1)
  return jnp.concatenate([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes):
  """[..., 4] xyxy -> [...]."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_box_iou(boxes1, boxes2, eps=0.0):
  """IoU and union of every pair: [..., N, 4], [..., M, 4] xyxy -> ([..., N, M], [..., N, M]).

  `eps` is added to the union in the IoU denominator (detrex `box_iou` uses 1e-6).
  """
  area1 = box_area(boxes1)[..., :, None]
  area2 = box_area(boxes2)[..., None, :]
  lt = jnp.maximum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.minimum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1 + area2 - inter
  return inter / (union + eps), union


def pairwise_generalized_box_iou(boxes1, boxes2, eps=0.0):
  """Generalised IoU of every pair (detectron2/detrex form): [..., N, 4], [..., M, 4] -> [..., N, M].

  `eps` goes into both denominators (union and enclosing area); detrex's `generalized_box_iou`,
  used by its Hungarian matcher, has eps=1e-6. The default 0 is the plain DETR form.
  """
  iou, union = pairwise_box_iou(boxes1, boxes2, eps)
  lt = jnp.minimum(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
  rb = jnp.maximum(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
  wh = jnp.clip(rb - lt, 0.0)
  enclosing = wh[..., 0] * wh[..., 1]
  return iou - (enclosing - union) / (enclosing + eps)


def elementwise_generalized_box_iou(boxes1, boxes2, eps=1e-6):
  """GIoU of matched pairs (detrex `generalized_box_iou` loss form, eps in the enclosing area).

  [..., 4], [..., 4] xyxy -> [...].
  """
  area1 = box_area(boxes1)
  area2 = box_area(boxes2)
  lt = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  rb = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  wh = jnp.clip(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  union = area1 + area2 - inter
  iou = inter / (union + eps)
  lt_c = jnp.minimum(boxes1[..., :2], boxes2[..., :2])
  rb_c = jnp.maximum(boxes1[..., 2:], boxes2[..., 2:])
  wh_c = jnp.clip(rb_c - lt_c, 0.0)
  enclosing = wh_c[..., 0] * wh_c[..., 1]
  return iou - (enclosing - union) / (enclosing + eps)


def inverse_sigmoid(x, eps=1e-3):
  """detrex `inverse_sigmoid`: log(x / (1 - x)) with x clamped to [0, 1] and both sides to >= eps."""
  x = jnp.clip(x, 0.0, 1.0)
  return jnp.log(jnp.clip(x, eps) / jnp.clip(1.0 - x, eps))
