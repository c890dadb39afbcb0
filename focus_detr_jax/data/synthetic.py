"""The embedded default dataset: deterministic synthetic shapes written in COCO format.

    ds = ensure_synthetic_dataset()            # easy, 256x256, generated once then reused
    ds.splits   # {"train": (images_dir, instances_train.json), "validation": (...)}

It is read through the same TFDS folder builder as any COCO-format folder (`coco_folder.py`).

Variants (decisions §10):
- "easy" (the demo's AP50 >= 0.5 gate): 4 classes (rectangle, ellipse, triangle, diamond), each
  with its own colour (jittered), 1-4 medium-to-large objects (18-50% of the short side), mild
  textured background, mild overlap (every object keeps >= 70% of its pixels visible).
- "hard": 10 classes, colours random (shape is the only cue), 3-15 objects from tiny (3% of the
  short side, ~8 px at 256) to large (60%), occlusion down to 40% visible, strong textures and
  clutter (lines and arcs that are not objects).

Every image is drawn from its own generator seeded by (seed, split, index), so the data does not
depend on the order or number of images generated. Boxes are the tight boxes of the visible
pixels; `area` is the visible pixel count. Images are JPEG (quality 92).
Location: `<root>/<variant>`, root defaulting to `$FOCUS_DETR_DATA_DIR/synthetic` or
`~/.cache/focus_detr_jax/synthetic`; the folder appears atomically when complete.
"""

import dataclasses
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
EASY_CLASSES = ("rectangle", "ellipse", "triangle", "diamond")
EASY_COLOURS = ((215, 45, 40), (40, 170, 65), (45, 85, 225), (235, 195, 30))
HARD_CLASSES = ("rectangle", "ellipse", "triangle", "diamond", "cross", "star", "ring",
                "hexagon", "trapezoid", "arrow")
SPLIT_IDS = {"train": 0, "validation": 1}


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
  """Where a generated variant lives."""
  root: str                                  # the variant folder
  splits: dict                               # split -> (images dir, instances JSON)
  class_names: tuple[str, ...]
  variant: str


@dataclasses.dataclass(frozen=True)
class _Spec:
  classes: tuple[str, ...]
  objects: tuple[int, int]                   # min, max objects per image
  size: tuple[float, float]                  # object size as a fraction of the short side
  log_size: bool
  aspect: tuple[float, float]
  min_visible: float
  max_iou: float
  class_colours: bool
  texture: float
  clutter: tuple[int, int]


_SPECS = {
    "easy": _Spec(EASY_CLASSES, (1, 4), (0.18, 0.5), False, (0.65, 1.55), 0.7, 0.3, True,
                  0.5, (0, 0)),
    "hard": _Spec(HARD_CLASSES, (3, 15), (0.03, 0.6), True, (0.5, 2.0), 0.4, 0.6, False, 1.0,
                  (4, 12)),
}


def default_root() -> str:
  base = os.environ.get("FOCUS_DETR_DATA_DIR") or os.path.join("~", ".cache", "focus_detr_jax")
  return os.path.join(os.path.expanduser(base), "synthetic")


def class_names(difficulty: str = "easy") -> tuple[str, ...]:
  return _spec(difficulty).classes


def _spec(difficulty: str) -> _Spec:
  if difficulty not in _SPECS:
    raise ValueError(f"difficulty must be one of {sorted(_SPECS)}, got {difficulty!r}")
  return _SPECS[difficulty]


# ----------------------------------------------------------------------------- drawing

def _shape_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
  """bool [h, w] mask of one shape filling its w x h box."""
  im = Image.new("L", (w, h), 0)
  d = ImageDraw.Draw(im)
  x1, y1 = w - 1, h - 1
  if kind == "rectangle":
    d.rectangle([0, 0, x1, y1], fill=255)
  elif kind == "ellipse":
    d.ellipse([0, 0, x1, y1], fill=255)
  elif kind == "triangle":
    apex = rng.uniform(0.2, 0.8) * x1
    d.polygon([(apex, 0), (x1, y1), (0, y1)], fill=255)
  elif kind == "diamond":
    d.polygon([(x1 / 2, 0), (x1, y1 / 2), (x1 / 2, y1), (0, y1 / 2)], fill=255)
  elif kind == "cross":
    d.rectangle([x1 / 3, 0, 2 * x1 / 3, y1], fill=255)
    d.rectangle([0, y1 / 3, x1, 2 * y1 / 3], fill=255)
  elif kind == "star":
    pts = []
    for i in range(10):
      r = 0.5 if i % 2 == 0 else 0.2
      a = -math.pi / 2 + i * math.pi / 5
      pts.append((x1 / 2 + r * x1 * math.cos(a), y1 / 2 + r * y1 * math.sin(a) * 1.05))
    d.polygon(pts, fill=255)
  elif kind == "ring":
    d.ellipse([0, 0, x1, y1], fill=255)
    d.ellipse([x1 * 0.28, y1 * 0.28, x1 * 0.72, y1 * 0.72], fill=0)
  elif kind == "hexagon":
    d.polygon([(x1 / 4, 0), (3 * x1 / 4, 0), (x1, y1 / 2), (3 * x1 / 4, y1), (x1 / 4, y1),
               (0, y1 / 2)], fill=255)
  elif kind == "trapezoid":
    d.polygon([(x1 / 4, 0), (3 * x1 / 4, 0), (x1, y1), (0, y1)], fill=255)
  elif kind == "arrow":
    d.rectangle([0, y1 * 0.35, x1 * 0.6, y1 * 0.65], fill=255)
    d.polygon([(x1 * 0.55, 0), (x1, y1 / 2), (x1 * 0.55, y1)], fill=255)
  else:
    raise ValueError(kind)
  mask = np.asarray(im) > 127
  if kind in ("triangle", "arrow", "trapezoid") and rng.random() < 0.5:
    mask = mask[::-1] if kind != "arrow" else mask[:, ::-1]
  return mask


def _smooth_noise(rng, h, w, cells, amplitude) -> np.ndarray:
  grid = rng.uniform(-1, 1, size=(cells, cells, 3)).astype(np.float32)
  img = Image.fromarray(((grid + 1) * 127.5).astype(np.uint8), "RGB").resize(
      (w, h), Image.BICUBIC)
  return (np.asarray(img, np.float32) / 127.5 - 1.0) * amplitude


def _background(rng, h, w, spec: _Spec) -> np.ndarray:
  base = rng.uniform(110, 200) + rng.uniform(-15, 15, size=3)
  t = spec.texture
  img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  angle = rng.uniform(0, 2 * math.pi)
  ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None]
  img = img + ramp * rng.uniform(-30, 30) * t
  img = img + _smooth_noise(rng, h, w, 4, 25 * t) + _smooth_noise(rng, h, w, 16, 14 * t * t)
  img = img + rng.normal(0, 3 + 6 * t, size=(h, w, 3))
  return img


def _clutter(rng, canvas: Image.Image, n: int, short: int):
  d = ImageDraw.Draw(canvas)
  w, h = canvas.size
  for _ in range(n):
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    width = int(rng.integers(1, max(2, short // 64) + 1))
    if rng.random() < 0.5:
      d.line([tuple(rng.uniform(0, [w, h])), tuple(rng.uniform(0, [w, h]))], fill=colour,
             width=width)
    else:
      x0, y0 = rng.uniform(0, [w, h])
      r = rng.uniform(0.05, 0.3) * short
      start = rng.uniform(0, 360)
      d.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(40, 200), fill=colour,
            width=width)


def _colour(rng, spec: _Spec, cls: int) -> np.ndarray:
  if spec.class_colours:
    return np.clip(np.asarray(EASY_COLOURS[cls], np.float32) + rng.uniform(-18, 18, 3), 0, 255)
  hue = rng.uniform(0, 1)
  rgb = Image.new("HSV", (1, 1), (int(hue * 255), int(rng.uniform(120, 255)),
                                  int(rng.uniform(60, 255)))).convert("RGB").getpixel((0, 0))
  return np.asarray(rgb, np.float32)


def _iou(a, b) -> float:
  ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / max(union, 1e-9)


def render_image(rng: np.random.Generator, h: int, w: int, difficulty: str = "easy"):
  """One synthetic image: (uint8 [h, w, 3], list of (class index, x0, y0, x1, y1, area)).

  Boxes are tight, pixel-inclusive-exclusive [x0, x1) x [y0, y1) boxes of the visible pixels.
  """
  spec = _spec(difficulty)
  short = min(h, w)
  img = _background(rng, h, w, spec)
  if spec.clutter[1]:
    layer = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    _clutter(rng, layer, int(rng.integers(spec.clutter[0], spec.clutter[1] + 1)), short)
    img = np.asarray(layer, np.float32)
  owner = np.full((h, w), -1, np.int32)       # index of the object owning each visible pixel
  objects = []                                # (class, full mask area, box)
  n_target = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
  for _ in range(n_target):
    for _attempt in range(25):
      lo, hi = spec.size
      frac = math.exp(rng.uniform(math.log(lo), math.log(hi))) if spec.log_size else (
          rng.uniform(lo, hi))
      aspect = math.exp(rng.uniform(math.log(spec.aspect[0]), math.log(spec.aspect[1])))
      side = frac * short
      ow = int(max(4, min(w, round(side * math.sqrt(aspect)))))
      oh = int(max(4, min(h, round(side / math.sqrt(aspect)))))
      x0 = int(rng.integers(0, w - ow + 1))
      y0 = int(rng.integers(0, h - oh + 1))
      box = (x0, y0, x0 + ow, y0 + oh)
      if any(_iou(box, o[2]) > spec.max_iou for o in objects):
        continue
      cls = int(rng.integers(0, len(spec.classes)))
      mask = _shape_mask(spec.classes[cls], ow, oh, rng)
      region = owner[y0:y0 + oh, x0:x0 + ow]
      ok = True
      for j, (_, full_area, _) in enumerate(objects):
        visible = np.count_nonzero(owner == j) - np.count_nonzero((region == j) & mask)
        if visible < spec.min_visible * full_area:
          ok = False
          break
      if not ok:
        continue
      idx = len(objects)
      objects.append((cls, int(mask.sum()), box))
      region[mask] = idx
      colour = _colour(rng, spec, cls)
      ramp = np.linspace(rng.uniform(0.85, 1.0), rng.uniform(1.0, 1.15), ow, dtype=np.float32)
      patch = np.broadcast_to(colour[None, None, :] * ramp[None, :, None], (oh, ow, 3))
      patch = patch + rng.normal(0, 2 + 4 * spec.texture, size=(oh, ow, 3))
      sub = img[y0:y0 + oh, x0:x0 + ow]
      sub[mask] = patch[mask]
      break
  annotations = []
  for j, (cls, _, _) in enumerate(objects):
    ys, xs = np.nonzero(owner == j)
    if ys.size == 0:
      continue
    annotations.append((cls, int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1,
                        int(ys.size)))
  return np.clip(np.round(img), 0, 255).astype(np.uint8), annotations


# ----------------------------------------------------------------------------- writing

def _write_split(folder: str, split: str, num: int, hw, difficulty: str, seed: int,
                 start_ann_id: int) -> tuple[str, str, int]:
  images_dir = os.path.join(folder, split)
  os.makedirs(images_dir, exist_ok=True)
  spec = _spec(difficulty)
  images, annotations = [], []
  ann_id = start_ann_id
  for i in range(num):
    rng = np.random.default_rng([seed, SPLIT_IDS[split], i, GENERATOR_VERSION])
    image, anns = render_image(rng, hw[0], hw[1], difficulty)
    image_id = SPLIT_IDS[split] * 10_000_000 + i + 1
    file_name = f"{image_id:012d}.jpg"
    Image.fromarray(image, "RGB").save(os.path.join(images_dir, file_name), quality=92)
    images.append({"id": image_id, "file_name": file_name, "height": hw[0], "width": hw[1]})
    for cls, x0, y0, x1, y1, area in anns:
      annotations.append({"id": ann_id, "image_id": image_id, "category_id": cls + 1,
                          "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area, "iscrowd": 0,
                          "segmentation": []})
      ann_id += 1
  ann_path = os.path.join(folder, "annotations", f"instances_{split}.json")
  os.makedirs(os.path.dirname(ann_path), exist_ok=True)
  with open(ann_path, "w") as f:
    json.dump({
        "info": {"description": f"focus_detr_jax synthetic shapes ({difficulty})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": n, "supercategory": "shape"}
                       for c, n in enumerate(spec.classes)],
    }, f)
  return images_dir, ann_path, ann_id


def _dataset(folder: str, variant: str, difficulty: str) -> SyntheticDataset:
  splits = {s: (os.path.join(folder, s), os.path.join(folder, "annotations",
                                                      f"instances_{s}.json"))
            for s in SPLIT_IDS}
  return SyntheticDataset(root=folder, splits=splits, class_names=class_names(difficulty),
                          variant=variant)


def ensure_synthetic_dataset(root: str | None = None, num_train: int = 1000, num_val: int = 200,
                             image_size=256, difficulty: str = "easy",
                             seed: int = 0) -> SyntheticDataset:
  """Generates the variant once (atomically) under `root`, then returns where it is.

  `image_size`: int (square) or (height, width). Deterministic given all arguments.
  """
  _spec(difficulty)
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  hw = (int(h), int(w))
  root = os.path.expanduser(root or default_root())
  variant = (f"{difficulty}_{hw[0]}x{hw[1]}_train{num_train}_val{num_val}_seed{seed}"
             f"_v{GENERATOR_VERSION}")
  folder = os.path.join(root, variant)
  if os.path.isfile(os.path.join(folder, "dataset.json")):
    return _dataset(folder, variant, difficulty)
  os.makedirs(root, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{variant}-", dir=root)
  try:
    ann_id = 1
    for split, num in (("train", num_train), ("validation", num_val)):
      _, _, ann_id = _write_split(tmp, split, num, hw, difficulty, seed, ann_id)
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
      json.dump({"difficulty": difficulty, "image_size": hw, "num_train": num_train,
                 "num_val": num_val, "seed": seed, "generator_version": GENERATOR_VERSION}, f)
    try:
      os.rename(tmp, folder)
    except OSError:  # another process finished first: use theirs
      if not os.path.isfile(os.path.join(folder, "dataset.json")):
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return _dataset(folder, variant, difficulty)
