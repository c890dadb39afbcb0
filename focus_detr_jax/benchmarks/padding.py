"""What padding does to the detections (issue 16, `scripts/measure_padding.py`): one model, the
same images, other canvases, each compared with exact evaluation (each image alone at its own
size, no padding: detrex's batch-1 evaluation).
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import common
from focus_detr_jax.benchmarks import table
from focus_detr_jax.checkpoint import load_model_checkpoint
from focus_detr_jax.data import buckets, synthetic
from focus_detr_jax.data.datasets import DataConfig
from focus_detr_jax.evaluation.evaluator import Evaluator
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.parity import reference as ref_lib
from focus_detr_jax.predict import jit_predict

OLD_COCO_CANVAS = (800, 1333)
SCORE_TOP = 100
RECOVER_TOP = 20
# Validation sizes (H, W) of the synthetic mix: long side 256 (the demo's eval size), the aspect
# ratios of COCO-like photos in both orientations.
SYNTHETIC_SIZES = ((192, 256), (171, 256), (144, 256), (256, 256), (256, 192), (256, 171))


def _iou(a, b):
  """[N,4] x [M,4] xyxy -> [N,M]."""
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=-1)
  area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=-1)
  return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def compare_detections(exact: Dict[str, np.ndarray], other: Dict[str, np.ndarray]
                       ) -> Tuple[float, float]:
  """(largest |change| of the sorted top-100 scores, share of the exact top-20 detections that
  the other has among its top 100 with the same label and box IoU >= 0.9)."""
  top_e = np.sort(exact["scores"])[::-1][:SCORE_TOP]
  top_o = np.sort(other["scores"])[::-1][:SCORE_TOP]
  score_change = float(np.abs(top_e - top_o).max())
  order_e = np.argsort(-exact["scores"], kind="stable")[:RECOVER_TOP]
  order_o = np.argsort(-other["scores"], kind="stable")[:SCORE_TOP]
  iou = _iou(exact["boxes"][order_e], other["boxes"][order_o])
  same = exact["labels"][order_e][:, None] == other["labels"][order_o][None, :]
  return score_change, float(((iou >= 0.9) & same).any(axis=1).mean())


def _detect(model, variables, images, valid, sizes, num_select) -> List[Dict[str, np.ndarray]]:
  """Per-image numpy detections of one batch."""
  sizes = jnp.asarray(sizes, jnp.int32)
  dets = jax.device_get(jit_predict(model, variables, jnp.asarray(images, jnp.float32),
                                    jnp.asarray(valid, bool), sizes, sizes,
                                    num_select=num_select))
  return [{k: np.asarray(v)[b] for k, v in dets.items()} for b in range(len(sizes))]


def _pad(image, canvas):
  """[h, w, 3] normalised -> ([1, H, W, 3] zero-padded bottom/right, [1, H, W] True on the
  image)."""
  pad = ((0, canvas[0] - image.shape[0]), (0, canvas[1] - image.shape[1]))
  return (np.pad(image, pad + ((0, 0),)).astype(np.float32)[None],
          np.pad(np.ones(image.shape[:2], bool), pad)[None])


def eval_canvas(h: int, w: int, canvases=common.COCO_EVAL_CANVASES) -> Tuple[int, int]:
  """The smallest canvas holding an (h, w) network input: `transforms.tf_eval_canvas_index`'s
  rule for an image that is already at its eval size (that function resizes first); with no
  canvas holding it, the old 800x1333 canvas instead of a rescale."""
  fits = [c for c in canvases if h <= c[0] and w <= c[1]]
  return min(fits, key=lambda c: c[0] * c[1]) if fits else OLD_COCO_CANVAS


def _with_mask(model_config, mask: bool):
  c = model_config.copy_and_resolve_references()
  c.eval_padding_mask = mask
  return c


def parity_padding(reference_dir) -> List[dict]:
  """A recorded parity set's reference model (detrex's R50, deterministic weights) on its eval
  images, padded as detrex batches them, in our evaluation canvas and in the old 800x1333 one,
  with our padding mask and without (detrex's eval mode), against exact (`compare_detections`).
  Rows {set, image, size, layout, canvas, fill, mask, score_change, recovered, exact_spread}."""
  reference = ref_lib.load_reference(reference_dir)
  config = ref_lib.config_for_reference(reference["meta"])
  images, valid, sizes = ref_lib.make_batch(reference["inputs"])
  _, variables = ref_lib.build_model(config, reference_dir, train=True)
  models = {m: FocusDETR.from_config(_with_mask(config.model, m)) for m in (False, True)}
  num_select = int(config.model.num_select)
  crops = [images[b, :h, :w] for b, (h, w) in enumerate(sizes)]

  def alone(mask, b, canvas):   # detections of image b alone, padded into `canvas`
    return _detect(models[mask], variables, *_pad(crops[b], canvas), sizes[b:b + 1],
                   num_select)[0]
  exact = [alone(False, b, im.shape[:2]) for b, im in enumerate(crops)]

  found = []   # (layout, mask, per-image (canvas, detections))
  if len(crops) > 1:
    for mask in (False, True):
      dets = _detect(models[mask], variables, images, valid, sizes, num_select)
      found.append(("detrex batch (padded to the batch max)", mask,
                    [(images.shape[1:3], d) for d in dets]))
  for layout, mask, pick in (("our eval canvas", True, lambda h, w: eval_canvas(h, w)),
                             ("old 800x1333 canvas", True, lambda h, w: OLD_COCO_CANVAS),
                             ("old 800x1333 canvas", False, lambda h, w: OLD_COCO_CANVAS)):
    canvases = [pick(*im.shape[:2]) for im in crops]
    found.append((layout, mask, [(c, alone(mask, b, c)) for b, c in enumerate(canvases)]))

  rows = []
  for layout, mask, per in found:
    for b, (canvas, dets) in enumerate(per):
      change, recovered = compare_detections(exact[b], dets)
      h, w = (int(x) for x in sizes[b])
      top = np.sort(exact[b]["scores"])[::-1][:SCORE_TOP]
      rows.append(dict(set=Path(reference_dir).name, image=b, size=(h, w), layout=layout,
                       canvas=tuple(int(x) for x in canvas), fill=h * w / float(np.prod(canvas)),
                       mask=mask, score_change=change, recovered=recovered,
                       exact_spread=float(top[0] - top[-1])))
  return rows


def mixed_validation_folder(root, sizes: Sequence[Tuple[int, int]] = SYNTHETIC_SIZES,
                            per_size: int = 32, seed: int = 7, difficulty: str = "easy"
                            ) -> Tuple[str, str]:
  """Synthetic validation images of several sizes as a COCO folder (written once under `root`,
  deterministic); returns (images_dir, annotations_json)."""
  root = Path(root)
  images_dir, ann_path = root / "images", root / "annotations.json"
  if ann_path.exists():
    return str(images_dir), str(ann_path)
  images_dir.mkdir(parents=True, exist_ok=True)
  images, annotations = [], []
  for s, (h, w) in enumerate(sizes):
    for i in range(per_size):
      rng = np.random.default_rng([seed, s, i])
      pixels, anns = synthetic.render_image(rng, h, w, difficulty)
      image_id = len(images) + 1
      name = f"{image_id:06d}.jpg"
      Image.fromarray(pixels, "RGB").save(images_dir / name, quality=92)
      images.append({"id": image_id, "file_name": name, "height": h, "width": w})
      for cls, x0, y0, x1, y1, area in anns:
        annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                            "category_id": cls + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": area, "iscrowd": 0, "segmentation": []})
  categories = [{"id": c + 1, "name": n, "supercategory": "shape"}
                for c, n in enumerate(synthetic.class_names(difficulty))]
  tmp = ann_path.with_suffix(".tmp")
  tmp.write_text(json.dumps({"images": images, "annotations": annotations,
                             "categories": categories}))
  os.replace(tmp, ann_path)   # written last: a folder with the JSON is complete
  return str(images_dir), str(ann_path)


def synthetic_padding_ap(model_dir, root, per_size: int = 32,
                         sizes: Sequence[Tuple[int, int]] = SYNTHETIC_SIZES) -> List[dict]:
  """COCO AP of the model in `model_dir` (a checkpoint: `demo_output/model`) on the mixed
  synthetic validation folder: exact, in the canvases `buckets.choose_eval_canvases` picks, in one
  square canvas (the old way). Rows {mode, canvases, fill, mask, AP, AP50, AP75, images,
  seconds}."""
  variables, config = load_model_checkpoint(model_dir)
  images_dir, ann_path = mixed_validation_folder(Path(root) / "mixed_val", sizes, per_size)
  data = config.data
  data.update(dataset="coco_folder", data_dir=str(Path(root) / "tfds"))
  data.folder.update(train_images="", train_annotations="", eval_images=images_dir,
                     eval_annotations=ann_path, name="padding_mix")
  hw = np.asarray([s for s in sizes for _ in range(per_size)], np.int64)
  long_side = int(data.eval_max_size)
  modes = (("exact (batch 1, own size)", dict(eval_exact=True), True),
           ("chosen eval canvases", dict(eval_canvases=buckets.choose_eval_canvases(hw, data)),
            True),
           (f"one {long_side}x{long_side} canvas (old)",
            dict(eval_canvases=((long_side, long_side),)), True),
           (f"one {long_side}x{long_side} canvas, no mask",
            dict(eval_canvases=((long_side, long_side),)), False))
  rows = []
  for name, overrides, mask in modes:
    c = config.copy_and_resolve_references()
    c.data.update(overrides)
    c.model.eval_padding_mask = mask
    model = FocusDETR.from_config(c.model)
    if c.data.eval_exact:
      canvases, fill = None, 1.0
    else:
      canvases = [list(x) for x in c.data.eval_canvases]
      padded, own, _ = buckets.eval_pixels_per_image(hw, c.data, c.data.eval_canvases)
      fill = own / padded
    metrics = Evaluator(model, DataConfig.from_config(c), c.model.num_select).run(variables)
    rows.append(dict(mode=name, canvases=canvases, fill=fill, mask=mask,
                     **{k: float(metrics[k]) for k in ("AP", "AP50", "AP75")},
                     images=int(metrics["num_images"]), seconds=float(metrics["eval_seconds"])))
  return rows


def markdown(parity_rows: Optional[List[dict]], ap_rows: Optional[List[dict]]) -> str:
  out = []
  if parity_rows:
    out += table(["set", "image (h x w)", "layout", "canvas", "fill", "padding mask",
                  "largest top-100 score change", "exact top-100 score spread",
                  "exact top-20 found again"],
                 [[str(r["set"]), f"{r['image']} ({r['size'][0]}x{r['size'][1]})", r["layout"],
                   f"{r['canvas'][0]}x{r['canvas'][1]}", f"{r['fill']:.2f}",
                   "ours" if r["mask"] else "none (detrex eval)", f"{r['score_change']:.2e}",
                   f"{r['exact_spread']:.2e}", f"{100 * r['recovered']:.0f}%"]
                  for r in parity_rows]) + [""]
  if ap_rows:
    out += table(["evaluation", "canvases", "fill", "AP", "AP50", "AP75", "images", "s"],
                 [[r["mode"], "own size" if r["canvases"] is None
                   else ", ".join(f"{h}x{w}" for h, w in r["canvases"]), f"{r['fill']:.2f}",
                   *(f"{100 * r[k]:.1f}" for k in ("AP", "AP50", "AP75")), str(r["images"]),
                   f"{r['seconds']:.0f}"] for r in ap_rows])
  return "\n".join(out)
