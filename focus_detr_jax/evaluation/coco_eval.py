"""COCO box evaluation with pycocotools (AP, AP50, AP75, APs, APm, APl)."""

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Dict, Mapping, Sequence

import numpy as np

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(image_ids, scores, labels, boxes_xyxy, valid, label_to_category):
  """Host arrays of a batch -> COCO result dicts (bbox as [x, y, w, h], original category ids).

  Args:
    image_ids: [B]; scores/labels: [B, K]; boxes_xyxy: [B, K, 4] pixels of the original image;
    valid: [B, K] bool (False: dropped, e.g. empty after clipping or a padded example).
    label_to_category: sequence or mapping, contiguous label -> dataset category id.
  """
  results = []
  for b in range(len(image_ids)):
    for k in np.nonzero(np.asarray(valid[b]))[0]:
      x0, y0, x1, y1 = (float(v) for v in boxes_xyxy[b, k])
      results.append({"image_id": int(image_ids[b]),
                      "category_id": int(label_to_category[int(labels[b, k])]),
                      "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[b, k])})
  return results


def _load_gt(gt):
  from pycocotools.coco import COCO
  if isinstance(gt, COCO):
    return gt
  data = json.loads(Path(gt).read_text()) if isinstance(gt, (str, Path)) else copy.deepcopy(gt)
  data.setdefault("info", {})
  data.setdefault("licenses", [])
  coco = COCO()
  coco.dataset = data
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def coco_evaluate(gt, detections: Sequence[Mapping], image_ids=None, verbose=False) -> Dict:
  """pycocotools COCOeval(bbox) of `detections` against `gt` (COCO dict, path or COCO object).

  Returns {AP, AP50, AP75, APs, APm, APl} as floats (-1 where COCO has no such object) and the
  printed summary under `summary`.
  """
  from pycocotools.cocoeval import COCOeval
  coco_gt = _load_gt(gt)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    if len(detections) == 0:
      stats = np.zeros(12)
    else:
      coco_dt = coco_gt.loadRes(list(detections))
      evaluator = COCOeval(coco_gt, coco_dt, "bbox")
      if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
      stats = evaluator.stats
  summary = out.getvalue()
  if verbose:
    print(summary)
  metrics = {name: float(stats[i]) for i, name in enumerate(METRIC_NAMES)}
  metrics["summary"] = summary
  return metrics


def format_table(metrics: Mapping[str, float]) -> str:
  """One-line table of the six AP numbers, x100 as detectron2 prints them."""
  head = " | ".join(f"{n:>6s}" for n in METRIC_NAMES)
  row = " | ".join(f"{100 * metrics[n]:6.2f}" for n in METRIC_NAMES)
  return f"| {head} |\n| {row} |"
