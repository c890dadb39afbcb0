"""Small helpers for tests and the demo: tiny configs, drawn COCO folders, alignment checks."""

import io
import json
import os

import numpy as np
from PIL import Image

from configs import common

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


def encode(img: np.ndarray, fmt: str = "JPEG", mode: str | None = None, **kw) -> bytes:
  im = Image.fromarray(img)
  if mode:
    im = im.convert(mode)
  buf = io.BytesIO()
  im.save(buf, format=fmt, **({"quality": 98} if fmt == "JPEG" else {}) | kw)
  return buf.getvalue()


def write_coco_folder(root: str, split: str, images, categories):
  """Writes a COCO folder. `images`: list of dicts with file_name, data (bytes or None for a
  missing file), id, height, width, annotations (list of COCO annotation dicts without ids).
  Returns (images dir, annotation path)."""
  images_dir = os.path.join(root, split)
  os.makedirs(images_dir, exist_ok=True)
  entries, anns = [], []
  ann_id = 1
  for im in images:
    if im.get("data") is not None:
      with open(os.path.join(images_dir, im["file_name"]), "wb") as f:
        f.write(im["data"])
    entry = {"id": im["id"], "file_name": im["file_name"]}
    if im.get("height"):
      entry.update(height=im["height"], width=im["width"])
    entries.append(entry)
    for a in im.get("annotations", []):
      anns.append({"id": ann_id, "image_id": im["id"], "iscrowd": 0, **a})
      ann_id += 1
  ann_path = os.path.join(root, "annotations", f"instances_{split}.json")
  os.makedirs(os.path.dirname(ann_path), exist_ok=True)
  with open(ann_path, "w") as f:
    json.dump({"images": entries, "annotations": anns, "categories": categories}, f)
  return images_dir, ann_path


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
