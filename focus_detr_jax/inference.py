"""Inference on image files, folders or a dataset split, with the evaluation's preprocessing
(usage: docs/inference.md, "From Python").

Images go through exactly the evaluation transform (`transforms.eval_example`: ResizeShortestEdge
(`eval_scale`, `eval_max_size`), placed top-left in the smallest canvas among
`data.eval_canvases or data.canvases` that holds it; if none does, the one of the closest aspect
ratio, scaled down to fit), are batched per canvas with padding slots, and run through one jitted
forward per canvas (`predict.predict_on_host`: the model, `postprocess` to the original pixels,
and the token maps). Nothing here is backend specific.

Files are read like the COCO-folder preparation (`coco_folder.load_image`: EXIF orientation
applied, CMYK/alpha/palette/16-bit converted to RGB); unreadable ones are reported through
`on_error` and skipped.
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np
import tensorflow as tf

from focus_detr_jax import config_check, visualize
from focus_detr_jax.checkpoint import (CONFIG_FILE, as_path, load_config, load_model_checkpoint,
                                       load_workdir_variables)
from focus_detr_jax.cli import UserError
from focus_detr_jax.data import (canvas as canvas_lib, coco_folder, coco_tfds, datasets,
                                 iterators, synthetic, transforms)
from focus_detr_jax.evaluation.coco_eval import detections_to_coco
from focus_detr_jax.predict import per_image, predict_on_host

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- model

def resolve_config(config=None, workdir=None, checkpoint=None):
  """The given config, else the one saved beside a model checkpoint or in a training workdir.

  A given config must build the same model as the saved one (`config_check`): a mismatch raises
  `ConfigMismatchError` naming the differing keys before anything is loaded.
  """
  directory, what = (checkpoint, "checkpoint") if checkpoint else (workdir, "workdir")
  if directory and not as_path(directory).exists():
    raise UserError(f"{what} {directory} does not exist")
  if config is not None:
    config_check.check_against_checkpoint(config, directory, what)
    return config
  if checkpoint:
    return load_config(checkpoint)
  if workdir and (as_path(workdir) / CONFIG_FILE).exists():
    return load_config(workdir)
  raise UserError(f"no config: {workdir} holds no config.json yet (it is written when training "
                  f"starts); pass --config")


def load_variables(workdir=None, checkpoint=None):
  """(variables, step) from a model checkpoint, or the newest restorable training checkpoint of a
  workdir (its EMA parameters when the run keeps them), at their stored shapes (`resolve_config`
  checks a given config against them); `step` is None for a model checkpoint."""
  if checkpoint:
    variables, _ = load_model_checkpoint(checkpoint)
    return variables, None
  variables, step = load_workdir_variables(workdir)
  return jax.device_put(variables, jax.local_devices()[0]), step


def category_info(data: datasets.DataConfig,
                  num_classes: int) -> Tuple[Tuple[int, ...], Tuple[str, ...], bool]:
  """(category id per label, name per label, found) of the configured dataset, without reading
  it. COCO: the 80 COCO ids; synthetic: 1..C and its class names; a COCO folder: the categories
  of its annotation files. When unknown or inconsistent with `num_classes`: (0..C-1, "0"..,
  False).
  """
  n = int(num_classes)
  ids, names = None, None
  try:
    if data.dataset == "coco":
      ids, names = coco_tfds.COCO_CATEGORY_IDS, coco_tfds.COCO_CATEGORY_NAMES
    elif data.dataset == "synthetic":
      names = tuple(synthetic.class_names(data.synthetic.difficulty))
      ids = tuple(range(1, len(names) + 1))
    elif data.dataset == "coco_folder":
      files = [f for f in (data.folder.train_annotations, data.folder.eval_annotations)
               if f and Path(f).is_file()]
      if files:
        cats = coco_folder.read_categories(files)
        ids, names = tuple(c["id"] for c in cats), tuple(c["name"] for c in cats)
  except Exception as e:  # pylint: disable=broad-except  # metadata is optional
    logging.warning("category metadata unavailable (%s); using contiguous labels", e)
  if ids is None or len(ids) != n:
    if ids is not None:
      logging.warning("dataset has %d categories but the model %d; using contiguous labels",
                      len(ids), n)
    return tuple(range(n)), tuple(str(i) for i in range(n)), False
  return tuple(int(i) for i in ids), tuple(names), True


# ----------------------------------------------------------------------------- files

def list_images(inputs: Sequence[str]) -> Tuple[List[Path], List[Tuple[str, str]]]:
  """Files (given directly, any extension) and folders (their image files, sorted, not recursive).

  Returns (paths, problems) where problems are (input, reason) for missing inputs.
  """
  paths, problems = [], []
  for entry in inputs:
    p = Path(entry).expanduser()
    if p.is_dir():
      paths += sorted(f for f in p.iterdir()
                      if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    elif p.is_file():
      paths.append(p)
    else:
      problems.append((str(entry), "not found"))
  return paths, problems


def image_ids_and_names(paths: Sequence[Path]) -> Tuple[List[int], List[str]]:
  """COCO image ids (the file stems when all are distinct integers, like COCO's file names;
  else 0..n-1 in order) and unique output names (stem, then stem_1, ...)."""
  stems = [p.stem for p in paths]
  if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
    ids = [int(s) for s in stems]
  else:
    ids = list(range(len(paths)))
  names, seen = [], {}
  for s in stems:
    k = seen.get(s, 0)
    seen[s] = k + 1
    names.append(s if k == 0 else f"{s}_{k}")
  return ids, names


def read_image(path) -> np.ndarray:
  """uint8 RGB [H, W, 3] of an image file, decoded as the data pipeline decodes it.

  Raises `coco_folder.BadImage` (with `.reason`) for missing, unreadable or corrupt files.
  """
  try:
    encoded, _, _ = coco_folder.load_image(str(path), None, "full")
  except coco_folder.BadImage as e:
    if "cannot identify image file" not in str(e):
      raise
    size = Path(path).stat().st_size if Path(path).exists() else 0
    raise coco_folder.BadImage(getattr(e, "reason", "images_corrupt"),
                               "empty file" if size == 0 else
                               f"not an image file ({size} bytes that no image format "
                               f"recognises)") from e
  try:
    return transforms.decode_image(tf.constant(encoded)).numpy()
  except Exception as e:  # pylint: disable=broad-except  # TF refuses what PIL accepted
    raise coco_folder.BadImage("images_corrupt", f"undecodable: {e}") from e


def network_input(image: np.ndarray,
                  data: datasets.DataConfig) -> Tuple[np.ndarray, Tuple[int, int], Any]:
  """The evaluation transform of one decoded image (`transforms.eval_example`).

  Returns (uint8 network image padded to its canvas [H, W, 3] (unpadded with eval_exact),
  (h, w) of the resized image, the canvas (H, W) or None).
  """
  scale, max_size = int(data.eval_scale), int(data.eval_max_size)
  canvases, canvas = data.eval_canvas_list, None
  img = tf.constant(image)
  target = transforms.resize_shortest_edge_size(tf.shape(img)[:2], scale, max_size)
  if canvases is not None:
    # The evaluation's rule: the smallest canvas that holds the resized image.
    canvas = canvases[int(transforms.tf_eval_canvas_index(
        tf.constant(image.shape[:2], tf.int32), canvases, scale, max_size))]
    target, _ = canvas_lib.tf_fit_size(target, canvas)
  out = transforms.resize_image(img, target)
  if canvas is not None:
    out = tf.image.pad_to_bounding_box(out, 0, 0, canvas[0], canvas[1])
  return out.numpy(), tuple(int(v) for v in target.numpy()), canvas


@dataclasses.dataclass
class ImageResult:
  """Predictions of one image. Boxes are xyxy in the pixels of `image` (the original)."""
  name: str
  image_id: int
  image: np.ndarray                  # uint8 [H, W, 3], the original image
  image_size: Tuple[int, int]        # (h, w) of the network input inside the canvas
  canvas: Tuple[int, int]            # (H, W) of the padded network input
  detections: Dict[str, np.ndarray]  # scores [K], labels [K], boxes [K, 4], valid [K]
  maps: Dict[str, np.ndarray]        # token maps of this image (predict.selection_maps)
  path: Optional[str] = None

  @property
  def orig_size(self) -> Tuple[int, int]:
    return int(self.image.shape[0]), int(self.image.shape[1])


def _predict_batch(model, variables, data, items, slots: int, num_select: int
                   ) -> Iterator[ImageResult]:
  """Results of (network input, ImageResult fields) of one canvas, run as `slots` images."""
  net = np.zeros((slots,) + items[0][0].shape, np.uint8)
  sizes = np.ones((slots, 2), np.int32)          # padding slots: a 1x1 image, like eval
  orig = np.ones((slots, 2), np.int32)
  for i, (network, fields) in enumerate(items):
    net[i], sizes[i], orig[i] = network, fields["image_size"], fields["image"].shape[:2]
  images, pixel_valid = iterators.normalize_batch(net, sizes, data.pixel_mean, data.pixel_std)
  dets, maps = predict_on_host(model, variables, images, pixel_valid, sizes, orig,
                               num_select=num_select)
  for i, (_, fields) in enumerate(items):
    yield ImageResult(**fields, detections=per_image(dets, i), maps=per_image(maps, i))


def predict_files(model, variables, data: datasets.DataConfig, inputs: Sequence[str], *,
                  num_select: int, batch_size: Optional[int] = None,
                  max_images: Optional[int] = None,
                  on_error: Optional[Callable[[str, str], None]] = None
                  ) -> Iterator[ImageResult]:
  """Predictions of image files and folders (in canvas batches; results come per batch).

  Args:
    data: the evaluation's preprocessing (`datasets.DataConfig`); inputs: files and/or
      folders; num_select: detections per image (`config.model.num_select`);
      batch_size: images per forward (default `eval_batch_size`, 1 with `eval_exact`);
    max_images: stop after this many readable images.
    on_error: called with (input, reason) for each missing or unreadable input (default: log).
  """
  on_error = on_error or (lambda path, why: logging.warning("skipping %s: %s", path, why))
  if data.eval_exact:   # one shape per image
    batch_size = 1
  elif batch_size is None:
    batch_size = int(data.eval_batch_size)
  paths, problems = list_images(inputs)
  for entry, why in problems:
    on_error(entry, why)
  ids, names = image_ids_and_names(paths)
  pending: Dict[Any, list] = {}   # per network input shape (= canvas)
  used = 0
  for path, image_id, name in zip(paths, ids, names):
    if max_images is not None and used >= max_images:
      break
    try:
      image = read_image(path)
    except coco_folder.BadImage as e:
      on_error(str(path), str(e))
      continue
    network, size, _ = network_input(image, data)
    used += 1
    items = pending.setdefault(network.shape, [])
    items.append((network, dict(name=name, image_id=image_id, image=image, image_size=size,
                                canvas=network.shape[:2], path=str(path))))
    if len(items) >= batch_size:
      yield from _predict_batch(model, variables, data, pending.pop(network.shape),
                                batch_size, num_select)
  for items in pending.values():
    yield from _predict_batch(model, variables, data, items, batch_size, num_select)


def predict_split(model, variables, data: datasets.DataConfig, split: str, *, num_select: int,
                  max_images: Optional[int] = None) -> Iterator[ImageResult]:
  """Predictions over a split of the configured dataset (`iterators.make_eval_iterator`).

  `ImageResult.image` is the network input resized back to the original size (the original
  pixels are not kept by the pipeline); boxes are in original pixels.
  """
  iterator = iterators.make_eval_iterator(data, 0, 1, split=split)
  used = 0
  for batch in iterator:
    if max_images is not None and used >= max_images:
      break
    dets, maps = predict_on_host(model, variables, batch["image"], batch["pixel_valid"],
                                 batch["image_size"], batch["orig_size"], num_select=num_select)
    for i in np.nonzero(batch["example_valid"])[0]:
      if max_images is not None and used >= max_images:
        break
      used += 1
      h, w = (int(v) for v in batch["image_size"][i])
      shown = visualize.denormalize(batch["image"][i, :h, :w], data.pixel_mean, data.pixel_std)
      shown = visualize.resize(shown, batch["orig_size"][i])
      yield ImageResult(name=str(int(batch["image_id"][i])), image_id=int(batch["image_id"][i]),
                        image=shown, image_size=(h, w), canvas=tuple(batch["image"].shape[1:3]),
                        detections=per_image(dets, i), maps=per_image(maps, i))
  iterators.log_stats(iterator)


def coco_results(result: ImageResult, label_to_category: Sequence[int]) -> List[Dict[str, Any]]:
  """COCO results entries of one image (valid detections; bbox xywh in original pixels)."""
  d = result.detections
  return detections_to_coco([result.image_id], d["scores"][None], d["labels"][None],
                            d["boxes"][None], d["valid"][None], label_to_category)
