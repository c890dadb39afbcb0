"""Helpers of the data tests: tiny configs, drawn images, alignment checks, and the host-side or
one-example views of the training stream that only the tests need."""

import dataclasses
import os
from typing import Optional

import numpy as np

from configs import common
from focus_detr_jax.data import buckets
from focus_detr_jax.data import canvas as canvas_lib
from focus_detr_jax.data import datasets
from focus_detr_jax.data import streams
from focus_detr_jax.data import transforms
from focus_detr_jax.data.testing import encode, write_coco_folder  # noqa: F401  (shared)
from focus_detr_jax.data.datasets import DataConfig

# Pure colours: easy to find again after resizing (one per object in drawn test images).
COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (255, 255, 255), (255, 128, 0))


def small_config(root: str, size: int = 128, **overrides):
  """The synthetic preset shrunk to `size`-pixel images and canvases (fast tests)."""
  c = common.get_data_config("synthetic")
  c.synthetic.root = os.path.join(root, "synthetic")
  c.synthetic.image_size = size
  c.synthetic.num_train = 16
  c.synthetic.num_val = 6
  c.data_dir = os.path.join(root, "tfds")
  c.canvases = ((size, size),)
  f = size / 256
  c.train_scales = tuple(sorted({int(s * f) for s in (160, 192, 224, 256)}))
  c.train_max_size = size
  c.crop_resize_scales = tuple(int(s * f) for s in (128, 160, 192))
  c.crop_size_range = (int(120 * f), int(192 * f))
  c.eval_scale = size
  c.eval_max_size = size
  c.batch_size = 4
  c.eval_batch_size = 4
  c.shuffle_buffer = 8
  c.num_parallel_calls = 2
  c.prefetch_batches = 1
  for k, v in overrides.items():
    c[k] = v
  return c


def drawn_image(hw, rects, background=0):
  """uint8 [h, w, 3] with rectangles (x0, y0, x1, y1) [pixel edges] in COLOURS order."""
  img = np.full((*hw, 3), background, np.uint8)
  for i, (x0, y0, x1, y1) in enumerate(rects):
    img[y0:y1, x0:x1] = COLOURS[i]
  return img


def denormalize(image: np.ndarray, config) -> np.ndarray:
  """float32 normalised image(s) -> uint8 (inverse of the pipeline's normalisation)."""
  mean = np.asarray(config.pixel_mean, np.float32)
  std = np.asarray(config.pixel_std, np.float32)
  return np.clip(np.round(image * std + mean), 0, 255).astype(np.uint8)


def colour_box(image: np.ndarray, colour, tol: int = 80):
  """Tight box (x0, y0, x1, y1) in pixel edges of the pixels close to `colour`; None if < 4."""
  dist = np.abs(image.astype(np.int32) - np.asarray(colour, np.int32)).sum(-1)
  ys, xs = np.nonzero(dist < tol)
  if ys.size < 4:
    return None
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def alignment_errors(image_u8, boxes_cxcywh, labels, valid, image_size, colours=COLOURS,
                     min_size=0.0):
  """Per valid box: max |box edge - edge of the pixels of its colour| in pixels.

  Also checks the converse: every colour visible in the image has a valid box (returns inf for
  a visible object without a box). Boxes narrower or lower than `min_size` pixels (slivers a
  crop left at the border of an object, whose pixels are mostly blends with the background)
  are not compared.
  """
  h, w = (int(v) for v in image_size)
  img = image_u8[:h, :w]
  errors = []
  seen = set()
  for box, label, ok in zip(boxes_cxcywh, labels, valid):
    if not ok:
      continue
    cx, cy, bw, bh = box
    pix = np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
    seen.add(int(label))
    if min(bw * w, bh * h) < min_size:
      continue
    found = colour_box(img, colours[int(label)])
    errors.append(np.inf if found is None else float(np.abs(found - pix).max()))
  for i, colour in enumerate(colours):
    if i not in seen and colour_box(img, colour) is not None:
      found = colour_box(img, colour)
      if (found[2] - found[0]) > 2 and (found[3] - found[1]) > 2:
        errors.append(np.inf)
  return errors


def train_example(example, key, canvas, cfg: datasets.DataConfig):
  """One training example through the stream's stages (`streams._train_group`, one aspect
  group): plan from the header size, decode + flip + crop, final resize into `canvas`.
  `stats` sums both stages' counters."""
  plan = transforms.train_plan(canvas_lib.tf_encoded_image_size(example["image"]), key, cfg, ())
  el = transforms.train_augment(example, plan, cfg)
  out = transforms.train_finish(el, el["short"], canvas, cfg)
  return {**out, "stats": out["stats"] + el["stats"]}


@dataclasses.dataclass(frozen=True)
class StepPlan:
  step: int
  group: int
  scale: Optional[int]     # None: drawn per image (one scale bucket)
  canvas: tuple[int, int]


def group_for_step(step: int, schedule: buckets.Schedule) -> tuple[int, int]:
  """(group, batch index in that group's stream) of training step `step`: the host-side twin
  of `buckets.tf_group_for_step` (the same `_split_step` on Python ints)."""
  split = buckets._split_step  # pylint: disable=protected-access
  g, k = split(int(step), 0, schedule.num_groups, schedule.group_counts, schedule.seed, 0,
               lambda c, x, y: x if c else y, lambda x, y: x // y)
  return int(g), int(k)


def plan_for_step(step: int, schedule: buckets.Schedule) -> StepPlan:
  """Host-side view of `step`: its group, scale and canvas (what the stream gives it)."""
  group, k = group_for_step(step, schedule)
  if not schedule.scale_per_step:
    return StepPlan(int(step), group, None, schedule.canvases[schedule.canvas_index(group, 0)])
  scale = int(buckets.tf_scale_for(group, k, schedule))
  canvas = tuple(int(v) for v in buckets.tf_canvas_for(group, scale, schedule))
  return StepPlan(int(step), group, scale, canvas)


def canvas_for_step(config, step: int) -> tuple[int, int]:
  """(H, W) of the training batch at `step` (the same on every host)."""
  return plan_for_step(step, streams.train_schedule(DataConfig.from_config(config))).canvas
