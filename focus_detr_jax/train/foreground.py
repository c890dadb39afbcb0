"""Foreground labels of the Foreground Token Selector and its loss (spec §3, parity/README §6.11).

detrex `GenTargets` + `compute_cls_loss` (projects/focus_detr/modeling/foreground_supervision.py):
a token is foreground iff its centre lies strictly inside some ground-truth box whose largest
centre-to-side distance falls in the token's level range. Labels are class-agnostic {0, 1}.

Shape letters: B images, M box slots (padded), N tokens of all levels (level 0 = finest first,
row-major inside a level), H_l x W_l the padded grid of level l.
"""

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

from focus_detr_jax.ops.boxes import box_cxcywh_to_xyxy

DEFAULT_STRIDES = (8, 16, 32, 64)
DEFAULT_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 999999))


def token_centres(level_shape: Tuple[int, int], stride: int):
  """Pixel centres of one level's tokens: [H_l * W_l, 2] float32 (x, y), row-major.

  detrex `coords_fmap2orig`: (j * s + s // 2, i * s + s // 2) over the full padded grid.
  """
  height, width = level_shape
  xs = jnp.arange(width, dtype=jnp.float32) * stride + (stride // 2)
  ys = jnp.arange(height, dtype=jnp.float32) * stride + (stride // 2)
  x = jnp.broadcast_to(xs[None, :], (height, width)).reshape(-1)
  y = jnp.broadcast_to(ys[:, None], (height, width)).reshape(-1)
  return jnp.stack([x, y], axis=-1)


def absolute_xyxy_boxes(boxes, image_size):
  """Normalised cxcywh [B, M, 4] -> absolute xyxy [B, M, 4] float32 of the unpadded image.

  `image_size`: [B, 2] (h, w). Same operation order as detrex (scale, then convert), so the
  corners are bitwise the ones `GenTargets` sees.
  """
  hw = image_size.astype(jnp.float32)
  scale = jnp.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=-1)[:, None, :]  # [B, 1, 4]
  return box_cxcywh_to_xyxy(boxes.astype(jnp.float32) * scale)


def foreground_labels(boxes, box_valid, image_size, level_shapes: Sequence[Tuple[int, int]],
                      strides: Sequence[int] = DEFAULT_STRIDES,
                      ranges: Sequence[Tuple[float, float]] = DEFAULT_RANGES):
  """Foreground label of every token, levels concatenated like the selector's scores.

  Args:
    boxes: [B, M, 4] float32 normalised cxcywh (relative to the unpadded image).
    box_valid: [B, M] bool; padded boxes never make a token positive.
    image_size: [B, 2] int (h, w) of the unpadded image.
    level_shapes: static ((H_0, W_0), ...) of the padded feature levels, finest first.
    strides: pixel stride of each level.
    ranges: (lo, hi) per level; positive iff lo < max(l, t, r, b) <= hi.

  Returns:
    [B, N] int32 in {0, 1}.
  """
  if not len(level_shapes) == len(strides) == len(ranges):
    raise ValueError(f"{len(level_shapes)} levels but {len(strides)} strides, {len(ranges)} ranges")
  xyxy = absolute_xyxy_boxes(boxes, image_size)  # [B, M, 4]
  labels = []
  for shape, stride, (lo, hi) in zip(level_shapes, strides, ranges):
    centres = token_centres(tuple(shape), stride)  # [HW, 2]
    x = centres[None, :, None, 0]  # [1, HW, 1]
    y = centres[None, :, None, 1]
    # Distances from the token centre to the four sides: [B, HW, M] each.
    left = x - xyxy[:, None, :, 0]
    top = y - xyxy[:, None, :, 1]
    right = xyxy[:, None, :, 2] - x
    bottom = xyxy[:, None, :, 3] - y
    off_min = jnp.minimum(jnp.minimum(left, top), jnp.minimum(right, bottom))
    off_max = jnp.maximum(jnp.maximum(left, top), jnp.maximum(right, bottom))
    positive = (off_min > 0) & (off_max > lo) & (off_max <= hi) & box_valid[:, None, :]
    labels.append(jnp.any(positive, axis=-1))  # [B, HW]
  return jnp.concatenate(labels, axis=1).astype(jnp.int32)


def sigmoid_focal_loss(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """Element-wise sigmoid focal loss (RetinaNet; detrex `sigmoid_focal_loss` before reduction).

  `alpha_t * (1 - p_t)^gamma * BCE(logits, targets)` with BCE written through log-sigmoid so that
  confident logits give finite values and gradients (detrex takes `log(p_t)` of a float32
  probability). Shared by the selector loss and every class loss of the criterion.

  Args:
    logits: [...] float.
    targets: [...] float or bool in {0, 1}, broadcastable to `logits`.

  Returns:
    [...] float32, same shape as `logits`.
  """
  logits = logits.astype(jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  log_p = jax.nn.log_sigmoid(logits)
  log_not_p = jax.nn.log_sigmoid(-logits)
  bce = -(targets * log_p + (1.0 - targets) * log_not_p)
  # 1 - p_t = sigmoid(-logits) for positives, sigmoid(logits) for negatives.
  one_minus_pt = targets * jax.nn.sigmoid(-logits) + (1.0 - targets) * jax.nn.sigmoid(logits)
  # An integer exponent keeps the gradient a plain polynomial (lax.integer_pow).
  exponent = int(gamma) if float(gamma).is_integer() else gamma
  loss = bce * one_minus_pt ** exponent
  if alpha >= 0:
    loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
  return loss


def select_loss_per_image(fg_score, fg_labels, alpha: float = 0.25, gamma: float = 2.0):
  """detrex `compute_cls_loss`: [B, N] logits, [B, N] {0,1} labels -> [B] float32.

  Every token counts, padded ones included (their label is 0); each image is divided by its
  number of positive tokens (at least 1).
  """
  loss = sigmoid_focal_loss(fg_score, fg_labels, alpha, gamma).sum(axis=1)
  num_pos = jnp.maximum(jnp.sum(fg_labels > 0, axis=1), 1).astype(jnp.float32)
  return loss / num_pos


def select_loss(fg_score, fg_labels, alpha: float = 0.25, gamma: float = 2.0):
  """The unweighted `select_loss`: mean over images of `select_loss_per_image`. Scalar float32.

  The criterion applies the weight (1.5).
  """
  return jnp.mean(select_loss_per_image(fg_score, fg_labels, alpha, gamma))
