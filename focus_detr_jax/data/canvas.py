"""Canvases: the few static image shapes a batch can have (decisions §4).

Every image is resized, then placed (top-left) into one of a small configured set of canvases
`(H, W)` and zero-padded bottom/right; if it still does not fit after its resize it is scaled
down to fit. Evaluation images go to the smallest canvas that holds them
(`transforms.tf_eval_canvas_index`); the step schedule (`buckets.py`) decides which canvas a
training step uses.

Everything here is cheap and host-side or pure TF; nothing touches jax.
"""

import math
from typing import Sequence

import tensorflow as tf


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


_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_STANDALONE_MARKERS = (0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8)


# Image container kinds (`tf_encoded_image_info`).
KIND_UNKNOWN, KIND_JPEG, KIND_PNG, KIND_GIF, KIND_BMP = 0, 1, 2, 3, 4
# PNG colour type -> channels (palette images count as 3).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def tf_encoded_image_info(encoded: tf.Tensor):
  """Header facts of an encoded image, in-graph: (hw int32 [2], kind int32, channels int32).

  `kind`: KIND_JPEG/PNG/GIF/BMP or KIND_UNKNOWN. `channels`: JPEG components (1 grayscale,
  3 YCbCr/RGB, 4 CMYK/YCCK) or PNG colour channels (1 gray, 2 gray+alpha, 3 RGB or palette,
  4 RGBA); 0 when unknown (GIF, BMP). Pure TF ops that never raise: unknown or broken headers
  give hw (0, 0). No Python callback: `tf.numpy_function` inside tf.data made processes hang at
  exit.
  """
  data = tf.io.decode_raw(encoded, tf.uint8)
  n = tf.size(data, out_type=tf.int64)
  padded = tf.cast(tf.pad(data, [[0, 1]]), tf.int64)  # index n reads 0

  def byte(i):  # 0 past the end (positions are never negative)
    return tf.gather(padded, tf.minimum(tf.cast(i, tf.int64), n))

  def be16(i):
    return byte(i) * 256 + byte(i + 1)

  def be32(i):
    return be16(i) * 65536 + be16(i + 2)

  def le16(i):
    return byte(i) + byte(i + 1) * 256

  def le32(i):
    return le16(i) + le16(i + 2) * 65536

  def starts_with(sig):
    ok = n >= len(sig)
    for k, v in enumerate(sig):
      ok = tf.logical_and(ok, tf.equal(byte(k), v))
    return ok

  zero = tf.constant(0, tf.int64)
  is_png = starts_with((137, 80, 78, 71, 13, 10, 26, 10))
  is_gif = starts_with((71, 73, 70, 56))
  is_bmp = starts_with((66, 77))
  is_jpeg = starts_with((0xFF, 0xD8))

  def jpeg_info():
    sof = tf.constant(_SOF_MARKERS, tf.int64)
    standalone = tf.constant(_STANDALONE_MARKERS, tf.int64)

    def cond(pos, h, w, c, done, it):
      return tf.logical_and(tf.logical_not(done), tf.logical_and(pos + 9 <= n, it < 100000))

    def body(pos, h, w, c, done, it):
      marker = byte(pos + 1)
      bad = tf.not_equal(byte(pos), 0xFF)
      fill = tf.equal(marker, 0xFF)
      is_sof = tf.reduce_any(tf.equal(marker, sof))
      alone = tf.reduce_any(tf.equal(marker, standalone))
      end = tf.logical_or(tf.equal(marker, 0xD9), tf.equal(marker, 0xDA))  # EOI/SOS first
      length = be16(pos + 2)
      new_pos = tf.where(fill, pos + 1, tf.where(alone, pos + 2, pos + 2 + length))
      found = tf.logical_and(tf.logical_not(bad), is_sof)
      h = tf.where(found, be16(pos + 5), h)
      w = tf.where(found, be16(pos + 7), w)
      c = tf.where(found, byte(pos + 9), c)
      stop = tf.logical_or(tf.logical_or(bad, found), tf.logical_or(
          end, tf.logical_and(tf.logical_not(fill | alone), length < 2)))
      return new_pos, h, w, c, stop, it + 1

    _, h, w, c, _, _ = tf.while_loop(
        cond, body, (tf.constant(2, tf.int64), zero, zero, zero, tf.constant(False), zero))
    return h, w, c, tf.constant(KIND_JPEG, tf.int64)

  def png_info():
    colour_type = byte(25)
    channels = tf.constant([_PNG_CHANNELS.get(t, 0) for t in range(7)], tf.int64)
    c = tf.where(colour_type < 7, tf.gather(channels, tf.minimum(colour_type, 6)), zero)
    return be32(20), be32(16), c, tf.constant(KIND_PNG, tf.int64)

  h, w, c, kind = tf.case([
      (is_png, png_info),
      (is_gif, lambda: (le16(8), le16(6), zero, tf.constant(KIND_GIF, tf.int64))),
      (is_bmp, lambda: (tf.abs(le32(22) - tf.where(le32(22) >= 2**31, 2**32, 0)), le32(18),
                        zero, tf.constant(KIND_BMP, tf.int64))),
      (is_jpeg, jpeg_info),
  ], default=lambda: (zero, zero, zero, tf.constant(KIND_UNKNOWN, tf.int64)), exclusive=False)
  ok = tf.logical_and(tf.logical_and(h > 0, w > 0), tf.logical_and(h < 2**31, w < 2**31))
  hw = tf.where(ok, tf.cast(tf.stack([h, w]), tf.int32), tf.zeros([2], tf.int32))
  return tf.ensure_shape(hw, [2]), tf.cast(kind, tf.int32), tf.cast(c, tf.int32)


def tf_encoded_image_size(encoded: tf.Tensor) -> tf.Tensor:
  """int32 [2] (h, w) of `tf_encoded_image_info` (never raises; (0, 0) when unknown)."""
  return tf_encoded_image_info(encoded)[0]


def tf_canvas_index(hw: tf.Tensor, canvases: Sequence[Canvas]) -> tf.Tensor:
  """Index of the canvas whose aspect ratio h/w is the closest (in log) to the image's, in-graph;
  `hw` int32 [2]. Exact ties (a square image between landscape and portrait) go to the first;
  unknown sizes (h or w <= 0, e.g. an unreadable header) to canvas 0."""
  if len(canvases) == 1:
    return tf.constant(0, tf.int32)
  h = tf.cast(hw[0], tf.float64)
  w = tf.cast(hw[1], tf.float64)
  known = tf.logical_and(h > 0, w > 0)
  log_aspect = tf.math.log(tf.maximum(h, 1.0) / tf.maximum(w, 1.0))
  targets = tf.constant([math.log(ch / cw) for ch, cw in canvases], tf.float64)
  costs = tf.round(tf.abs(log_aspect - targets) * 1e9)
  idx = tf.cast(tf.argmin(costs), tf.int32)
  return tf.where(known, idx, 0)


def tf_fit_size(hw: tf.Tensor, canvas: Canvas) -> tuple[tf.Tensor, tf.Tensor]:
  """(h, w) scaled down (never up) so it fits inside `canvas`, unchanged if it already fits,
  in-graph: returns ((h, w) int32 [2], rescaled bool). `canvas` may be a tensor."""
  ch, cw = tf.cast(canvas[0], tf.int32), tf.cast(canvas[1], tf.int32)
  h = tf.cast(hw[0], tf.float32)
  w = tf.cast(hw[1], tf.float32)
  fits = tf.logical_and(hw[0] <= ch, hw[1] <= cw)
  scale = tf.minimum(tf.cast(ch, tf.float32) / h, tf.cast(cw, tf.float32) / w)
  nh = tf.clip_by_value(tf.cast(tf.floor(h * scale + 0.5), tf.int32), 1, ch)
  nw = tf.clip_by_value(tf.cast(tf.floor(w * scale + 0.5), tf.int32), 1, cw)
  out = tf.where(fits, tf.cast(hw, tf.int32), tf.stack([nh, nw]))
  return out, tf.logical_not(fits)
