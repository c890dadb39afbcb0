"""Inference post-processing (detrex `FOCUS_DETR.inference` + detectron2 `detector_postprocess`)."""

import jax
import jax.numpy as jnp

from focus_detr_jax.ops.boxes import box_cxcywh_to_xyxy


def postprocess(pred_logits, pred_boxes, image_size, output_size=None, num_select=300):
  """Top-`num_select` (query, class) pairs per image, boxes in output pixels.

  Args:
    pred_logits: [B, Q, C]; pred_boxes: [B, Q, 4] normalised cxcywh (of the unpadded image).
    image_size: [B, 2] (h, w) of the unpadded network input.
    output_size: [B, 2] (h, w) to rescale to (e.g. the original image); default image_size.
  Returns:
    dict scores [B, K] (descending), labels [B, K] int32, boxes [B, K, 4] xyxy clipped to the
    output size, valid [B, K] bool (False where detectron2 would drop an empty box). No NMS.
  """
  b, q, c = pred_logits.shape
  prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32)).reshape(b, q * c)
  scores, flat = jax.lax.top_k(prob, num_select)
  query = flat // c
  labels = (flat % c).astype(jnp.int32)
  boxes = jnp.take_along_axis(pred_boxes.astype(jnp.float32), query[..., None], axis=1)
  h = image_size[:, 0].astype(jnp.float32)
  w = image_size[:, 1].astype(jnp.float32)
  boxes = box_cxcywh_to_xyxy(boxes) * jnp.stack([w, h, w, h], -1)[:, None, :]
  if output_size is not None:
    oh = output_size[:, 0].astype(jnp.float32)
    ow = output_size[:, 1].astype(jnp.float32)
    boxes = boxes * jnp.stack([ow / w, oh / h, ow / w, oh / h], -1)[:, None, :]
    h, w = oh, ow
  limits = jnp.stack([w, h, w, h], -1)[:, None, :]
  boxes = jnp.clip(boxes, 0.0, limits)
  valid = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  return dict(scores=scores, labels=labels, boxes=boxes, valid=valid, query=query)
