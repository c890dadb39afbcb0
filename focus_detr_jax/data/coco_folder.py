"""A TFDS builder for any local COCO-format folder (images + instances JSON); no network.

    builder = CocoFolder(splits={"train": ("/data/coco/train2017",
                                           "/data/coco/annotations/instances_train2017.json"),
                                 "validation": (...)}, data_dir="/data/tfds")
    builder.download_and_prepare()     # once; validates and writes TFRecords
    ds = builder.as_dataset("train")   # same features as TFDS coco/2017

Features are those of TFDS `coco/2017` (image, image/filename, image/id, objects: id, area,
bbox normalised [ymin, xmin, ymax, xmax], label, is_crowd), so the same pipeline reads both.
Category ids are mapped to contiguous labels 0..C-1 in increasing id order (COCO's order, the
same as TFDS coco/2017); the map back (`category_ids`) and the names live in the prepared
dataset's metadata (`builder.info.metadata`) for the evaluation.

Preparation never crashes on bad input and never drops it silently. Each image is opened (and,
with `verify="full"`, fully decoded) with PIL:
- missing, unreadable, truncated or corrupt files: skipped;
- RGB JPEG/PNG and grayscale JPEG/PNG: stored byte for byte (TF decodes grayscale to RGB by
  replication, as detectron2 does);
- CMYK, alpha, palette, 16-bit and other formats (GIF, BMP, TIFF, WebP): converted to RGB and
  stored as lossless PNG;
- EXIF orientation applied (as detectron2 `read_image` does) unless the annotation's
  width/height says the annotations were made on the raw pixels;
- a JSON width/height that differs from the real size: the boxes are rescaled to the real size;
- boxes: non-finite or zero-area dropped, partly outside clipped, fully outside dropped,
  unknown category ids dropped; images without any annotation are kept (evaluation needs them;
  training skips them).
Every case is counted; counts are logged, returned by `prepare_stats` and saved in the metadata.
"""

import collections
import hashlib
import io
import json
import logging
import math
import os
import re
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

Image.MAX_IMAGE_PIXELS = None  # large aerial/medical images are legitimate data

PREPARE_STATS = (
    "images_listed", "images_written", "images_missing", "images_corrupt",
    "images_invalid_entry", "images_duplicate_id", "images_png",
    "images_grayscale", "images_converted_cmyk", "images_converted_alpha",
    "images_converted_palette", "images_converted_high_bit_depth",
    "images_converted_other_format", "images_exif_rotated", "images_size_mismatch_rescaled",
    "images_without_annotations", "annotations_listed", "annotations_unknown_image",
    "annotations_unknown_category", "boxes_written", "boxes_invalid_dropped",
    "boxes_zero_area_dropped", "boxes_outside_dropped", "boxes_clipped")

_KEEP_FORMATS = ("JPEG", "PNG")
_KEEP_MODES = ("RGB", "L")
# PIL mode -> the counter of its conversion to RGB (None: not counted).
_CONVERSIONS = {"L": None, "CMYK": "images_converted_cmyk", "P": "images_converted_palette",
                **dict.fromkeys(("YCbCr", "LAB", "HSV", "1"), "images_converted_other_format"),
                **dict.fromkeys(("RGBA", "LA", "RGBa", "La", "PA"), "images_converted_alpha")}


class BadImage(Exception):
  """An image that cannot be used; `reason` is the stats key it is counted under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str | None]:
  """PIL image of any mode -> RGB; returns (image, conversion stats key or None)."""
  mode = im.mode
  if mode == "RGB":
    return im, None
  if mode in _CONVERSIONS:
    return im.convert("RGB"), _CONVERSIONS[mode]
  # 16/32-bit integer or float: scale to 8 bits.
  arr = np.asarray(im).astype(np.float64)
  if arr.ndim == 3:
    arr = arr[..., :3]
  if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
    arr = arr / 257.0
  arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
  if arr.ndim == 2:
    arr = np.stack([arr] * 3, axis=-1)
  return Image.fromarray(arr, "RGB"), "images_converted_high_bit_depth"


def load_image(path: str, json_hw: tuple[int, int] | None, verify: str = "full"):
  """Reads and validates one image file.

  Returns (encoded bytes to store, (height, width) of the stored image, list of stats keys).
  Raises `BadImage` for files that must be skipped.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadImage("images_missing", str(e)) from e
  try:
    im = Image.open(io.BytesIO(data))
    fmt = im.format
  except Exception as e:  # pylint: disable=broad-except
    raise BadImage("images_corrupt", f"unreadable: {e}") from e
  notes = []
  try:
    if verify == "full":
      im.load()
    orientation = 1
    if fmt == "JPEG":
      try:
        orientation = int(im.getexif().get(0x0112, 1) or 1)
      except Exception:  # pylint: disable=broad-except  # broken EXIF: ignore it
        orientation = 1
    raw_hw = (im.height, im.width)
    exif_hw = raw_hw[::-1] if orientation in (5, 6, 7, 8) else raw_hw
    apply_exif = orientation in range(2, 9) and (json_hw is None or json_hw == exif_hw or
                                                 json_hw != raw_hw)
    reencode = fmt not in _KEEP_FORMATS or im.mode not in _KEEP_MODES or apply_exif
    if fmt == "PNG":
      notes.append("images_png")
    if im.mode == "L":
      notes.append("images_grayscale")
    if not reencode:
      return data, raw_hw, notes
    im.load()
    if apply_exif:
      im = ImageOps.exif_transpose(im)
      notes.append("images_exif_rotated")
    rgb, why = _to_rgb(im)
    if why is None and fmt not in _KEEP_FORMATS:
      why = "images_converted_other_format"
    if why:
      notes.append(why)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), (rgb.height, rgb.width), notes
  except BadImage:
    raise
  except Exception as e:  # pylint: disable=broad-except  # truncated/corrupt pixel data
    raise BadImage("images_corrupt", f"truncated or corrupt: {e}") from e


def read_categories(annotation_paths) -> list[dict]:
  """Union of the `categories` of the given instances JSON files, sorted by id."""
  cats = {}
  for path in annotation_paths:
    with open(path) as f:
      data = json.load(f)
    for c in data.get("categories", []):
      cid = int(c["id"])
      cats.setdefault(cid, str(c.get("name", f"category_{cid}")))
  if not cats:
    raise ValueError(f"No categories in {list(annotation_paths)}.")
  return [{"id": cid, "name": cats[cid]} for cid in sorted(cats)]


def _unique_names(names):
  seen = collections.Counter()
  out = []
  for n in names:
    seen[n] += 1
    out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
  return out


def _finite(*values) -> bool:
  try:
    return all(math.isfinite(float(v)) for v in values)
  except (TypeError, ValueError):
    return False


def convert_annotations(anns, cat_to_label, hw, scale_yx, stats):
  """COCO annotations of one image -> TFDS `objects` list (boxes clipped/validated, counted)."""
  h, w = hw
  sy, sx = scale_yx
  objects = []
  for ann in anns:
    cid = ann.get("category_id")
    if cid not in cat_to_label:
      stats["annotations_unknown_category"] += 1
      continue
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not _finite(*bbox):
      stats["boxes_invalid_dropped"] += 1
      continue
    x, y, bw, bh = (float(v) for v in bbox)
    x, bw, y, bh = x * sx, bw * sx, y * sy, bh * sy
    if bw <= 0 or bh <= 0:
      stats["boxes_zero_area_dropped"] += 1
      continue
    x0, y0 = min(max(x, 0.0), w), min(max(y, 0.0), h)
    x1, y1 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
      stats["boxes_outside_dropped"] += 1
      continue
    if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
      stats["boxes_clipped"] += 1
    area = ann.get("area")
    area = float(area) * sx * sy if _finite(area) else (x1 - x0) * (y1 - y0)
    objects.append({
        "id": int(ann["id"]) if _finite(ann.get("id")) else -1,
        "area": int(round(area)),
        "bbox": tfds.features.BBox(ymin=min(y0 / h, 1.0), xmin=min(x0 / w, 1.0),
                                   ymax=min(y1 / h, 1.0), xmax=min(x1 / w, 1.0)),
        "label": cat_to_label[cid],
        "is_crowd": bool(ann.get("iscrowd", 0)),
    })
  stats["boxes_written"] += len(objects)
  return objects


def _fingerprint(splits: Mapping[str, tuple[str, str]], verify: str) -> str:
  h = hashlib.sha1(verify.encode())
  for name in sorted(splits):
    images, ann = splits[name]
    st = os.stat(ann)
    h.update(f"{name}|{images}|{ann}|{st.st_size}|{st.st_mtime_ns}".encode())
  return h.hexdigest()[:10]


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "folder"


class CocoFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """COCO-format folder -> TFDS dataset with the features of `coco/2017`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "COCO-format folders with coco/2017 features."}

  def __init__(self, *, splits: Mapping[str, tuple[str, str]], name: str | None = None,
               verify: str = "full", data_dir=None, **kwargs):
    """`splits`: split name -> (images directory, instances JSON path).

    `name`: readable part of the config name (default: the annotation file's folder); a hash of
    the paths and the JSON files' size/mtime is appended, so a changed folder is prepared anew.
    `verify`: "full" decodes every image at preparation (catches truncated files) or "header".
    """
    if verify not in ("full", "header"):
      raise ValueError(f"verify must be 'full' or 'header', got {verify!r}")
    self._folder_splits = {k: (os.path.abspath(os.path.expanduser(v[0])),
                               os.path.abspath(os.path.expanduser(v[1])))
                           for k, v in splits.items()}
    for split, (_, ann) in self._folder_splits.items():
      if not os.path.isfile(ann):
        raise FileNotFoundError(f"Annotation file of split {split!r} not found: {ann}")
    self._verify = verify
    base = name or os.path.basename(os.path.dirname(next(iter(
        self._folder_splits.values()))[1]))
    config_name = f"{_slug(base)}_{_fingerprint(self._folder_splits, verify)}"
    self._prepare_stats = {}
    self._categories = self._cached_categories(data_dir, config_name)
    if self._categories is None:
      self._categories = read_categories([a for _, a in self._folder_splits.values()])
    config = tfds.core.BuilderConfig(name=config_name, description=str(self._folder_splits))
    super().__init__(data_dir=data_dir, config=config, **kwargs)

  def _cached_categories(self, data_dir, config_name):
    root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
    path = os.path.join(root, self.name, config_name, str(self.VERSION), "metadata.json")
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      meta = json.load(f)
    return [{"id": i, "name": n} for i, n in zip(meta["category_ids"], meta["category_names"])]

  @property
  def category_ids(self) -> list[int]:
    """Original category id of each contiguous label."""
    return [c["id"] for c in self._categories]

  @property
  def category_names(self) -> list[str]:
    return [c["name"] for c in self._categories]

  @property
  def prepare_stats(self) -> dict:
    """Per split, the counts of the last preparation (or those saved with the dataset)."""
    return self._prepare_stats or dict(self.info.metadata.get("prepare_stats", {}))

  def _info(self) -> tfds.core.DatasetInfo:
    names = _unique_names(self.category_names)
    metadata = tfds.core.MetadataDict(
        category_ids=self.category_ids, category_names=self.category_names,
        source_splits={k: list(v) for k, v in self._folder_splits.items()}, prepare_stats={})
    return tfds.core.DatasetInfo(
        builder=self,
        description="COCO-format folder with the features of TFDS coco/2017.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence({
                "id": np.int64,
                "area": np.int64,
                "bbox": tfds.features.BBoxFeature(),
                "label": tfds.features.ClassLabel(names=names),
                "is_crowd": np.bool_,
            }),
        }),
        metadata=metadata,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, images, ann)
            for split, (images, ann) in self._folder_splits.items()}

  def _generate_examples(self, split, images_dir, annotation_path):
    stats = collections.Counter({k: 0 for k in PREPARE_STATS})
    with open(annotation_path) as f:
      data = json.load(f)
    cat_to_label = {c["id"]: i for i, c in enumerate(self._categories)}
    by_image = collections.defaultdict(list)
    images = {}                           # id -> entry
    for entry in data.get("images", []):
      stats["images_listed"] += 1
      if not isinstance(entry, dict) or not _finite(entry.get("id")) or not isinstance(
          entry.get("file_name"), str):
        stats["images_invalid_entry"] += 1
        continue
      if int(entry["id"]) in images:
        stats["images_duplicate_id"] += 1
        continue
      images[int(entry["id"])] = entry
    for ann in data.get("annotations", []):
      stats["annotations_listed"] += 1
      iid = ann.get("image_id") if isinstance(ann, dict) else None
      if not _finite(iid) or int(iid) not in images:
        stats["annotations_unknown_image"] += 1
        continue
      by_image[int(iid)].append(ann)
    del data

    for iid, entry in sorted(images.items()):
      json_hw = None
      if _finite(entry.get("height"), entry.get("width")) and entry["height"] > 0 and (
          entry["width"] > 0):
        json_hw = (int(entry["height"]), int(entry["width"]))
      path = os.path.join(images_dir, entry["file_name"])
      try:
        encoded, hw, notes = load_image(path, json_hw, self._verify)
      except BadImage as e:
        stats[e.reason] += 1
        logging.warning("coco_folder %s: skipping image %s (%s)", split, path, e)
        continue
      for note in notes:
        stats[note] += 1
      scale = (1.0, 1.0)
      if json_hw is not None and json_hw != hw:
        stats["images_size_mismatch_rescaled"] += 1
        scale = (hw[0] / json_hw[0], hw[1] / json_hw[1])
      objects = convert_annotations(
          sorted(by_image.get(iid, []), key=lambda a: a.get("id", 0) if _finite(
              a.get("id")) else 0), cat_to_label, hw, scale, stats)
      if not objects:
        stats["images_without_annotations"] += 1
      stats["images_written"] += 1
      yield iid, {
          "image": encoded,
          "image/filename": entry["file_name"],
          "image/id": iid,
          "objects": objects,
      }
    self._prepare_stats[split] = dict(stats)
    self.info.metadata["prepare_stats"] = dict(self._prepare_stats)
    logging.info("coco_folder %s prepared: %s", split, format_stats(stats))


def format_stats(stats: Mapping[str, int]) -> str:
  """'key=value' for the non-zero counts, in a stable order."""
  return ", ".join(f"{k}={v}" for k, v in sorted(stats.items()) if v) or "(all zero)"


def prepare(splits: Mapping[str, tuple[str, str]], data_dir=None, name=None,
            verify: str = "full") -> CocoFolder:
  """Builds (once) and returns the prepared builder of a COCO-format folder."""
  builder = CocoFolder(splits=splits, name=name, verify=verify, data_dir=data_dir)
  builder.download_and_prepare()
  return builder
