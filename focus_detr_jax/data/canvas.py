"""Canvases: the few static image shapes a batch can have (decisions §4).

Every image is resized, then placed (top-left) into one of a small configured set of canvases
`(H, W)` and zero-padded bottom/right. Images are routed to the canvas whose aspect ratio is the
closest to theirs (landscape vs portrait); if an image still does not fit after its resize it is
scaled down to fit. Which canvas a training batch uses is chosen by a schedule seeded by the
step, so all hosts agree without looking at each other's data.

Everything here is cheap and host-side or pure TF; nothing touches jax.
"""

import io
import math
from typing import Sequence

import numpy as np
import tensorflow as tf
from PIL import Image


Canvas = tuple[int, int]  # (H, W)


def normalize_canvases(canvases) -> tuple[Canvas, ...]:
  """Canvas list from a config value ((H, W), ...) -> tuple of int pairs; validated."""
  out = tuple((int(h), int(w)) for h, w in canvases)
  if not out:
    raise ValueError("At least one canvas (H, W) is required.")
  for h, w in out:
    if h <= 0 or w <= 0:
      raise ValueError(f"Canvas sizes must be positive, got {(h, w)}.")
  return out


def canvas_index_for_size(height, width, canvases: Sequence[Canvas]) -> int:
  """Index of the canvas whose aspect ratio h/w is the closest (in log) to the image's.

  Unknown sizes (height or width <= 0, e.g. an unreadable header) go to canvas 0.
  """
  if len(canvases) == 1 or height <= 0 or width <= 0:
    return 0
  log_aspect = math.log(height / width)
  costs = [abs(log_aspect - math.log(h / w)) for h, w in canvases]
  return int(np.argmin(costs))


def encoded_image_size(encoded: bytes) -> tuple[int, int]:
  """(height, width) read from an encoded image's header without decoding; (0, 0) if unreadable."""
  try:
    with Image.open(io.BytesIO(encoded)) as im:
      width, height = im.size
    return int(height), int(width)
  except Exception:  # pylint: disable=broad-except  # any unreadable header -> unknown size
    return 0, 0


def tf_encoded_image_size(encoded: tf.Tensor) -> tf.Tensor:
  """In-graph wrapper of `encoded_image_size`: int32 [2] (h, w); never raises."""
  def _size(b):
    return np.asarray(encoded_image_size(bytes(b)), np.int32)
  hw = tf.numpy_function(_size, [encoded], tf.int32, stateful=False)
  hw.set_shape([2])
  return hw


def tf_canvas_index(hw: tf.Tensor, canvases: Sequence[Canvas]) -> tf.Tensor:
  """In-graph `canvas_index_for_size`; `hw` int32 [2]. Same tie-breaking (first wins)."""
  if len(canvases) == 1:
    return tf.constant(0, tf.int32)
  h = tf.cast(hw[0], tf.float64)
  w = tf.cast(hw[1], tf.float64)
  known = tf.logical_and(h > 0, w > 0)
  log_aspect = tf.math.log(tf.maximum(h, 1.0) / tf.maximum(w, 1.0))
  targets = tf.constant([math.log(ch / cw) for ch, cw in canvases], tf.float64)
  idx = tf.cast(tf.argmin(tf.abs(log_aspect - targets)), tf.int32)
  return tf.where(known, idx, 0)


def fit_size(height, width, canvas: Canvas) -> tuple[int, int]:
  """(h, w) scaled down (never up) so it fits inside `canvas`; unchanged if it already fits."""
  ch, cw = canvas
  if height <= ch and width <= cw:
    return int(height), int(width)
  scale = min(ch / height, cw / width)
  return max(1, min(ch, int(height * scale + 0.5))), max(1, min(cw, int(width * scale + 0.5)))


def tf_fit_size(hw: tf.Tensor, canvas: Canvas) -> tuple[tf.Tensor, tf.Tensor]:
  """In-graph `fit_size`: returns ((h, w) int32 [2], rescaled bool)."""
  ch, cw = canvas
  h = tf.cast(hw[0], tf.float32)
  w = tf.cast(hw[1], tf.float32)
  fits = tf.logical_and(hw[0] <= ch, hw[1] <= cw)
  scale = tf.minimum(ch / h, cw / w)
  nh = tf.clip_by_value(tf.cast(tf.floor(h * scale + 0.5), tf.int32), 1, ch)
  nw = tf.clip_by_value(tf.cast(tf.floor(w * scale + 0.5), tf.int32), 1, cw)
  out = tf.where(fits, tf.cast(hw, tf.int32), tf.stack([nh, nw]))
  return out, tf.logical_not(fits)


def _schedule_logits(num_canvases: int, weights) -> tf.Tensor:
  if weights is None:
    weights = [1.0] * num_canvases
  weights = np.asarray(weights, np.float64)
  if weights.shape != (num_canvases,) or np.any(weights < 0) or weights.sum() <= 0:
    raise ValueError(f"canvas_weights must be {num_canvases} non-negative numbers, got {weights}.")
  with np.errstate(divide="ignore"):
    logits = np.log(weights / weights.sum())
  return tf.constant(logits[None, :], tf.float32)


def tf_canvas_for_step(step: tf.Tensor, num_canvases: int, seed: int, weights=None) -> tf.Tensor:
  """Canvas index (int64 scalar) of a training step: a stateless draw keyed by (seed, step)."""
  if num_canvases == 1:
    return tf.constant(0, tf.int64)
  logits = _schedule_logits(num_canvases, weights)
  key = tf.stack([tf.constant(seed, tf.int64) + 7919, tf.cast(step, tf.int64)])
  return tf.random.stateless_categorical(logits, 1, seed=key, dtype=tf.int64)[0, 0]


def canvas_schedule(steps, num_canvases: int, seed: int, weights=None) -> np.ndarray:
  """Host-side view of the schedule: canvas index of each step in `steps` (same draws as TF)."""
  steps = np.asarray(steps, np.int64).reshape(-1)
  return np.array([int(tf_canvas_for_step(s, num_canvases, seed, weights)) for s in steps],
                  np.int64)


def schedule_dataset(num_canvases: int, seed: int, weights=None) -> tf.data.Dataset:
  """Infinite dataset of canvas indices, one per step from step 0 (checkpointed with the input)."""
  return tf.data.Dataset.range(1 << 62).map(
      lambda s: tf_canvas_for_step(s, num_canvases, seed, weights))
