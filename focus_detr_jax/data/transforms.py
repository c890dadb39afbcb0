"""Per-example detection transforms in TF (detrex `coco_detr.py` + `DetrDatasetMapper`, spec §9).

Training: horizontal flip (p 0.5); then 50/50 either
  (a) ResizeShortestEdge(short in `train_scales`, max `train_max_size`), or
  (b) ResizeShortestEdge(short in `crop_resize_scales`, no max) -> RandomCrop("absolute_range",
      `crop_size_range`) -> ResizeShortestEdge(short in `train_scales`, max `train_max_size`);
crowd boxes dropped, boxes clipped to the image and empty ones removed (width or height <= 1e-5 px,
detectron2 `filter_empty_instances`). Evaluation: ResizeShortestEdge(`eval_scale`, `eval_max_size`).
Finally the image is scaled down if it does not fit its canvas and placed top-left in it.

Boxes travel as absolute-pixel xyxy float32 and leave as normalised cxcywh relative to the
resized, unpadded image. Images stay uint8 (resized with antialiased bilinear, rounded like PIL);
normalisation happens after batching (`iterators.py`, `device.py`) so tf.data buffers and iterator
checkpoints stay 4x smaller.

All randomness is stateless, keyed by (seed, position of the example in its stream), so the
output is a pure function of the position: exact resume only needs the position.
"""

from typing import Sequence

import tensorflow as tf

from focus_detr_jax.data import buckets
from focus_detr_jax.data import canvas as canvas_lib
from focus_detr_jax.data.datasets import DataConfig

# Per-example counters produced by the map (summed over the stream by `streams.py`).
EXAMPLE_STATS = (
    "images_without_annotations",   # no non-crowd box: skipped in training (detectron2
                                    # filter_empty=True), kept in evaluation (COCO counts them)
    "images_png",                   # PNG data (any file name): decoded, used
    "images_grayscale",             # 1-channel (or gray+alpha) data: replicated to RGB, used
    "images_cmyk",                  # 4-component JPEG (CMYK/YCCK): converted to RGB, used
    "images_gif_or_bmp",            # GIF/BMP data: decoded (first frame), used
    "images_rescaled_to_fit",       # did not fit its canvas after the resize: scaled down
    "images_truncated",             # had more than max_boxes boxes
    "boxes_crowd_dropped",          # is_crowd boxes (never targets)
    "boxes_clipped",                # partly outside the image: clipped to it
    "boxes_invalid_dropped",        # zero-area, inverted, non-finite or entirely outside
    "boxes_emptied_by_augmentation",  # cropped away / degenerate after resize
    "boxes_truncated",              # beyond max_boxes
)
EMPTY_BOX_THRESHOLD = 1e-5  # detectron2 Boxes.nonempty(threshold)


# ----------------------------------------------------------------------------- geometry helpers

def image_format_counts(encoded: tf.Tensor, header=None) -> dict:
  """Counters of the image container/colour format, read from the header (never raises).

  `header`: the example's `image/header` if the pipeline already read it (else read here).
  """
  if header is None:
    _, kind, channels = canvas_lib.tf_encoded_image_info(encoded)
  else:
    kind, channels = header["kind"], header["channels"]
  one = lambda c: tf.cast(c, tf.int64)  # pylint: disable=unnecessary-lambda-assignment
  return {
      "images_png": one(tf.equal(kind, canvas_lib.KIND_PNG)),
      "images_grayscale": one(tf.logical_or(tf.equal(channels, 1), tf.equal(channels, 2))),
      "images_cmyk": one(tf.logical_and(tf.equal(kind, canvas_lib.KIND_JPEG),
                                        tf.equal(channels, 4))),
      "images_gif_or_bmp": one(tf.logical_or(tf.equal(kind, canvas_lib.KIND_GIF),
                                             tf.equal(kind, canvas_lib.KIND_BMP))),
  }


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 [h, w, 3] RGB (grayscale/RGBA/CMYK converted).

  JPEGs are decoded with libjpeg's accurate integer IDCT: bit-identical to PIL, which detectron2
  reads images with (TF's default fast IDCT differs by up to ~15 levels at sharp edges).
  Raises (inside tf.data: the element is dropped by `ignore_errors` and counted) on corrupt or
  truncated data.
  """
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False))
  image.set_shape([None, None, 3])
  tf.debugging.assert_positive(tf.size(image), message="empty image")
  return image


def resize_shortest_edge_size(hw: tf.Tensor, short, max_size) -> tf.Tensor:
  """detectron2 `ResizeShortestEdge.get_output_shape`: int32 [2] (new h, new w).

  `short` may be a tensor; `max_size` <= 0 means unlimited. float64 like detectron2's Python.
  """
  h = tf.cast(hw[0], tf.float64)
  w = tf.cast(hw[1], tf.float64)
  size = tf.cast(short, tf.float64)
  scale = size / tf.minimum(h, w)
  newh = tf.where(h < w, size, scale * h)
  neww = tf.where(h < w, scale * w, size)
  if max_size and max_size > 0:
    m = tf.constant(float(max_size), tf.float64)
    over = tf.maximum(newh, neww) > m
    rescale = m / tf.maximum(newh, neww)
    newh = tf.where(over, newh * rescale, newh)
    neww = tf.where(over, neww * rescale, neww)
  return tf.maximum(tf.cast(tf.stack([tf.floor(newh + 0.5), tf.floor(neww + 0.5)]), tf.int32), 1)


def resize_image(image: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
  """uint8 [h, w, 3] -> uint8 [size[0], size[1], 3], bilinear like PIL, rounded.

  Antialiased (PIL's bilinear widens its filter when shrinking) only if a side shrinks: when
  enlarging, the antialias kernel is plain bilinear (same pixels up to rounding) and ~3x slower.
  """
  size = tf.cast(size, tf.int32)
  shrinks = tf.reduce_any(size < tf.shape(image)[:2])
  out = tf.cond(shrinks,
                lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
                lambda: tf.image.resize(image, size, method="bilinear", antialias=False))
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def scale_boxes(boxes: tf.Tensor, from_hw: tf.Tensor, to_hw: tf.Tensor) -> tf.Tensor:
  """xyxy [N, 4] absolute boxes from an image of size from_hw to one of size to_hw."""
  sy = tf.cast(to_hw[0], tf.float32) / tf.cast(from_hw[0], tf.float32)
  sx = tf.cast(to_hw[1], tf.float32) / tf.cast(from_hw[1], tf.float32)
  return boxes * tf.stack([sx, sy, sx, sy])


def clip_boxes(boxes: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
  w = tf.cast(hw[1], tf.float32)
  h = tf.cast(hw[0], tf.float32)
  return tf.clip_by_value(boxes, 0.0, tf.stack([w, h, w, h]))


def nonempty(boxes: tf.Tensor) -> tf.Tensor:
  """bool [N]: width and height > 1e-5 (detectron2 `Boxes.nonempty`)."""
  return tf.logical_and(boxes[:, 2] - boxes[:, 0] > EMPTY_BOX_THRESHOLD,
                        boxes[:, 3] - boxes[:, 1] > EMPTY_BOX_THRESHOLD)


def hflip(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Horizontal flip of a uint8 image and its xyxy boxes (x -> w - x)."""
  w = tf.cast(tf.shape(image)[1], tf.float32)
  flipped = tf.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
  return tf.reverse(image, axis=[1]), flipped


def _count(mask: tf.Tensor) -> tf.Tensor:
  return tf.reduce_sum(tf.cast(mask, tf.int64))


def clean_boxes(bbox_yxyx: tf.Tensor, labels: tf.Tensor, is_crowd: tf.Tensor, hw: tf.Tensor,
                drop_crowd: bool):
  """TFDS boxes (normalised [ymin, xmin, ymax, xmax]) -> absolute xyxy, cleaned.

  Returns (boxes [N', 4] float32, labels [N'] int32, is_crowd [N'] bool, stats dict): crowd boxes
  dropped if `drop_crowd`; non-finite, zero-area, inverted and fully-outside boxes dropped; boxes
  partly outside the image clipped.
  """
  bbox = tf.reshape(tf.cast(bbox_yxyx, tf.float32), [-1, 4])
  n = tf.shape(bbox)[0]
  labels = tf.cast(labels, tf.int32)[:n]
  is_crowd = tf.cast(is_crowd, tf.bool)[:n]
  h = tf.cast(hw[0], tf.float32)
  w = tf.cast(hw[1], tf.float32)
  raw = tf.stack([bbox[:, 1] * w, bbox[:, 0] * h, bbox[:, 3] * w, bbox[:, 2] * h], axis=1)
  finite = tf.reduce_all(tf.math.is_finite(raw), axis=1)
  raw = tf.where(finite[:, None], raw, 0.0)
  clipped = clip_boxes(raw, hw)
  was_clipped = tf.reduce_any(tf.abs(clipped - raw) > 1e-3, axis=1)
  valid = tf.logical_and(finite, nonempty(clipped))
  crowd = tf.logical_and(is_crowd, drop_crowd)
  keep = tf.logical_and(valid, tf.logical_not(crowd))
  stats = {
      "boxes_crowd_dropped": _count(crowd),
      "boxes_invalid_dropped": _count(tf.logical_and(tf.logical_not(valid),
                                                     tf.logical_not(crowd))),
      "boxes_clipped": _count(tf.logical_and(keep, was_clipped)),
  }
  return (tf.boolean_mask(clipped, keep), tf.boolean_mask(labels, keep),
          tf.boolean_mask(is_crowd, keep), stats)


def crop(image: tf.Tensor, boxes: tf.Tensor, labels: tf.Tensor, box: tf.Tensor):
  """Crops `box` (int32 [y0, x0, ch, cw], `crop_box`; shrunk to fit the image: a box drawn from
  the header size may meet a slightly different decoded size) out of an image and its xyxy boxes:
  boxes shifted, clipped to the crop, the empty ones removed. Returns (image, boxes, labels,
  number of boxes removed).
  """
  hw = tf.shape(image)[:2]
  y0, x0, ch, cw = tf.unstack(box)
  ch, cw = tf.minimum(ch, hw[0]), tf.minimum(cw, hw[1])
  y0, x0 = tf.minimum(y0, hw[0] - ch), tf.minimum(x0, hw[1] - cw)
  image = image[y0:y0 + ch, x0:x0 + cw]
  offset = tf.cast(tf.stack([x0, y0, x0, y0]), tf.float32)
  boxes = clip_boxes(boxes - offset, tf.stack([ch, cw]))
  keep = nonempty(boxes)
  return (image, tf.boolean_mask(boxes, keep), tf.boolean_mask(labels, keep),
          _count(tf.logical_not(keep)))


def _choice(values: Sequence[int], key) -> tf.Tensor:
  values = tf.constant(list(values), tf.int32)
  idx = tf.random.stateless_uniform([], key, minval=0, maxval=tf.size(values), dtype=tf.int32)
  return values[idx]


def targets_from_boxes(boxes: tf.Tensor, labels: tf.Tensor, hw: tf.Tensor, max_boxes: int):
  """Absolute xyxy boxes -> padded normalised cxcywh targets.

  Returns (boxes [M, 4] float32, labels [M] int32, box_valid [M] bool, truncated box count).
  The first `max_boxes` boxes are kept (decisions §7: truncated, counted, reported).
  """
  n = tf.shape(boxes)[0]
  h = tf.cast(hw[0], tf.float32)
  w = tf.cast(hw[1], tf.float32)
  cxcywh = tf.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h,
                     (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h], axis=1)
  kept = tf.minimum(n, max_boxes)
  pad = max_boxes - kept
  out_boxes = tf.ensure_shape(tf.pad(cxcywh[:kept], [[0, pad], [0, 0]]), [max_boxes, 4])
  out_labels = tf.ensure_shape(tf.pad(labels[:kept], [[0, pad]]), [max_boxes])
  return out_boxes, out_labels, tf.range(max_boxes) < kept, tf.cast(n - kept, tf.int64)


# ----------------------------------------------------------------------------- whole examples

def _zero_stats():
  return {k: tf.constant(0, tf.int64) for k in EXAMPLE_STATS}


def _finish(image, boxes, labels, target_hw, canvas, cfg: DataConfig, stats, orig_hw,
            image_id, keep):
  """Fit `target_hw` into the canvas, resize once, pad, make targets. `canvas` None: no padding."""
  in_hw = tf.shape(image)[:2]
  if canvas is not None:
    target_hw, rescaled = canvas_lib.tf_fit_size(target_hw, canvas)
    stats["images_rescaled_to_fit"] = tf.cast(rescaled, tf.int64)
  image = resize_image(image, target_hw)
  boxes = clip_boxes(scale_boxes(boxes, in_hw, target_hw), target_hw)
  ne = nonempty(boxes)
  stats["boxes_emptied_by_augmentation"] += _count(tf.logical_not(ne))
  boxes = tf.boolean_mask(boxes, ne)
  labels = tf.boolean_mask(labels, ne)
  if canvas is not None:
    image = tf.image.pad_to_bounding_box(image, 0, 0, canvas[0], canvas[1])
    if not isinstance(canvas, tf.Tensor):
      image = tf.ensure_shape(image, [canvas[0], canvas[1], 3])
  tboxes, tlabels, valid, truncated = targets_from_boxes(boxes, labels, target_hw,
                                                         cfg.max_boxes)
  stats["boxes_truncated"] = truncated
  stats["images_truncated"] = tf.cast(truncated > 0, tf.int64)
  return {
      "image": image,
      "image_size": tf.cast(target_hw, tf.int32),
      "orig_size": tf.cast(orig_hw, tf.int32),
      "image_id": tf.cast(image_id, tf.int64),
      "boxes": tboxes,
      "labels": tlabels,
      "box_valid": valid,
      "keep": tf.convert_to_tensor(keep),
      "stats": tf.stack([stats[k] for k in EXAMPLE_STATS]),
  }


def _decode_and_clean(example, cfg: DataConfig):
  """Decoded image, its (h, w), cleaned boxes and labels, and the example's counters."""
  objects = example["objects"]
  image = decode_image(example["image"])
  orig_hw = tf.shape(image)[:2]
  boxes, labels, _, stats = clean_boxes(objects["bbox"], objects["label"],
                                        tf.cast(objects["is_crowd"], tf.bool), orig_hw,
                                        cfg.drop_crowd)
  stats = {**_zero_stats(), **stats,
           **image_format_counts(example["image"], example.get("image/header"))}
  return image, orig_hw, boxes, labels, stats


# ----------------------------------------------------------------------------- training in two stages
# The training stream (`streams.py`) transforms an example in two stages so that the canvas can
# follow the step: `train_plan` draws every random choice from the header size (no decoding), which
# gives the image's aspect group before anything is decoded; `train_augment` decodes and applies
# flip and the crop branch; `train_finish` applies the final multi-scale resize (the step's scale,
# or the image's own) and pads into the step's canvas.

def train_plan(hw: tf.Tensor, key: tf.Tensor, cfg: DataConfig, group_bounds) -> dict:
  """Random choices of one training example from its header size `hw` (int32 [2]).

  Returns flip, crop (bool), short (per-image final scale), short1 (crop branch's first resize),
  crop_box int32 [4] (y0, x0, ch, cw on the first resize), group (int32, `buckets.aspect_group`
  of the image before its final resize: the crop's, or the original's).
  """
  keys = tf.random.experimental.stateless_split(key, num=10)
  flip = tf.random.stateless_uniform([], keys[0]) < cfg.flip_prob
  use_crop = tf.random.stateless_uniform([], keys[1]) < cfg.crop_prob
  if not cfg.augment:
    flip, use_crop = tf.constant(False), tf.constant(False)
  short = _choice(cfg.train_scales, keys[2])
  short1 = _choice(cfg.crop_resize_scales, keys[3])
  hw1 = resize_shortest_edge_size(hw, short1, cfg.crop_resize_max_size)
  box = crop_box(hw1[0], hw1[1], cfg.crop_size_range, keys[4:8])
  pre = tf.where(use_crop, box[2:], tf.cast(hw, tf.int32))
  return {"flip": flip, "crop": use_crop, "short": short, "short1": short1, "crop_box": box,
          "group": buckets.tf_aspect_group(pre[0], pre[1], group_bounds)}


def crop_box(h, w, crop_range, keys) -> tf.Tensor:
  """detectron2 RandomCrop("absolute_range") draws on an (h, w) image: int32 [y0, x0, ch, cw]."""
  lo, hi = crop_range
  ch = tf.random.stateless_uniform([], keys[0], minval=tf.minimum(h, lo),
                                   maxval=tf.minimum(h, hi) + 1, dtype=tf.int32)
  cw = tf.random.stateless_uniform([], keys[1], minval=tf.minimum(w, lo),
                                   maxval=tf.minimum(w, hi) + 1, dtype=tf.int32)
  y0 = tf.random.stateless_uniform([], keys[2], minval=0, maxval=h - ch + 1, dtype=tf.int32)
  x0 = tf.random.stateless_uniform([], keys[3], minval=0, maxval=w - cw + 1, dtype=tf.int32)
  return tf.stack([y0, x0, ch, cw])


def train_augment(example, plan: dict, cfg: DataConfig) -> dict:
  """Stage 1: decode, clean boxes, flip, crop branch. Variable-size uint8 image, xyxy boxes.

  Output: image uint8 [h, w, 3], boxes float32 [n, 4] absolute xyxy, labels int32 [n],
  orig_size, image_id, short (int32), keep (False: no non-crowd annotation, skipped),
  stats int64 [len(EXAMPLE_STATS)].
  """
  # Whether it has a non-crowd box (always True unless images without one are skipped).
  has_annotations = tf.constant(True) if not cfg.skip_images_without_annotations else (
      tf.reduce_any(tf.logical_not(tf.cast(example["objects"]["is_crowd"], tf.bool))))
  def pack(image, boxes, labels, orig_hw, stats, keep):
    return {"image": image, "boxes": tf.reshape(boxes, [-1, 4]), "labels": labels,
            "orig_size": tf.cast(orig_hw, tf.int32),
            "image_id": tf.cast(example["image/id"], tf.int64),
            "short": tf.cast(plan["short"], tf.int32), "keep": tf.convert_to_tensor(keep),
            "stats": tf.stack([stats[k] for k in EXAMPLE_STATS])}

  def skipped():
    stats = _zero_stats()
    stats["images_without_annotations"] = tf.constant(1, tf.int64)
    return pack(tf.zeros([1, 1, 3], tf.uint8), tf.zeros([0, 4]), tf.zeros([0], tf.int32),
                tf.ones([2], tf.int32), stats, False)

  def processed():
    image, orig_hw, boxes, labels, stats = _decode_and_clean(example, cfg)
    if not cfg.augment:
      return pack(image, boxes, labels, orig_hw, stats, True)
    image, boxes = tf.cond(plan["flip"], lambda: hflip(image, boxes), lambda: (image, boxes))

    def cropped():
      hw1 = resize_shortest_edge_size(orig_hw, plan["short1"], cfg.crop_resize_max_size)
      im1 = resize_image(image, hw1)
      b1 = clip_boxes(scale_boxes(boxes, orig_hw, hw1), hw1)
      return crop(im1, b1, labels, plan["crop_box"])

    image2, boxes2, labels2, removed = tf.cond(
        plan["crop"], cropped, lambda: (image, boxes, labels, tf.constant(0, tf.int64)))
    stats["boxes_emptied_by_augmentation"] += removed
    return pack(image2, boxes2, labels2, orig_hw, stats, True)

  return tf.cond(has_annotations, processed, skipped)


def train_finish(el: dict, short, canvas, cfg: DataConfig) -> dict:
  """Stage 2: the final ResizeShortestEdge(`short`, `train_max_size`) (eval size without
  augmentation), fit into `canvas` (int32 [2] tensor or static pair), pad, targets.

  Returns the `_finish` dict; its `stats` hold only this stage's counters.
  """
  hw = tf.shape(el["image"])[:2]
  target = resize_shortest_edge_size(hw, *((short, cfg.train_max_size) if cfg.augment else
                                           (cfg.eval_scale, cfg.eval_max_size)))
  return _finish(el["image"], el["boxes"], el["labels"], target, canvas, cfg, _zero_stats(),
                 el["orig_size"], el["image_id"], el["keep"])


def tf_eval_canvas_index(hw: tf.Tensor, canvases: Sequence[canvas_lib.Canvas], scale: int,
                         max_size: int) -> tf.Tensor:
  """Evaluation routing, in-graph: the smallest-area canvas that holds the image after the eval
  resize (computed from the header size `hw`); if none does, the closest aspect ratio (the
  image is then scaled down to fit, counted). Ties go to the first."""
  if len(canvases) == 1:
    return tf.constant(0, tf.int32)
  known = tf.logical_and(hw[0] > 0, hw[1] > 0)
  size = resize_shortest_edge_size(tf.maximum(hw, 1), scale, max_size)
  c = tf.constant(canvases, tf.int64)
  fits = tf.logical_and(tf.cast(size[0], tf.int64) <= c[:, 0],
                        tf.cast(size[1], tf.int64) <= c[:, 1])
  area = tf.where(fits, c[:, 0] * c[:, 1], tf.constant(2**62, tf.int64))
  smallest = tf.cast(tf.argmin(area), tf.int32)
  closest = canvas_lib.tf_canvas_index(hw, canvases)
  return tf.where(tf.logical_and(known, tf.reduce_any(fits)), smallest, closest)


def eval_example(example, canvas, cfg: DataConfig):
  """One evaluation example: ResizeShortestEdge(eval_scale, eval_max_size), fit, pad.

  Images without annotations are kept (COCO evaluation counts them). `canvas` None: no padding
  (exact mode, one shape per image).
  """
  image, orig_hw, boxes, labels, stats = _decode_and_clean(example, cfg)
  stats["images_without_annotations"] = tf.cast(tf.equal(tf.size(labels), 0), tf.int64)
  target = resize_shortest_edge_size(orig_hw, cfg.eval_scale, cfg.eval_max_size)
  return _finish(image, boxes, labels, target, canvas, cfg, stats, orig_hw, example["image/id"],
                 True)
