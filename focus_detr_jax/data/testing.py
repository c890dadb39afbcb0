"""Small COCO folders written from memory (the input benchmark and the tests)."""

import io
import json
import os

import numpy as np
from PIL import Image


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
  for im in images:
    if im.get("data") is not None:
      with open(os.path.join(images_dir, im["file_name"]), "wb") as f:
        f.write(im["data"])
    entry = {"id": im["id"], "file_name": im["file_name"]}
    if im.get("height"):
      entry.update(height=im["height"], width=im["width"])
    entries.append(entry)
    for a in im.get("annotations", []):
      anns.append({"id": len(anns) + 1, "image_id": im["id"], "iscrowd": 0, **a})
  ann_path = os.path.join(root, "annotations", f"instances_{split}.json")
  os.makedirs(os.path.dirname(ann_path), exist_ok=True)
  with open(ann_path, "w") as f:
    json.dump({"images": entries, "annotations": anns, "categories": categories}, f)
  return images_dir, ann_path
