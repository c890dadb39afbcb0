"""COCO evaluation of a model over the eval split (periodic in training, or standalone).

Runs the jitted predict step over every eval batch of this host, drops padded examples and
empty boxes, gathers the detections of all processes, maps labels back to the dataset's category
ids and scores them with pycocotools. Results JSON and metrics land in the workdir.
"""

import functools
import json
import logging
import time
from typing import Dict, Optional

import jax
import numpy as np

from focus_detr_jax.checkpoint import as_path
from focus_detr_jax.data import datasets, iterators
from focus_detr_jax.evaluation.coco_eval import (METRIC_NAMES, coco_evaluate, detections_to_coco,
                                                 format_table)
from focus_detr_jax.predict import jit_predict


def _allgather(tree):
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


class Evaluator:
  """`run(variables, step)` -> {AP, AP50, AP75, APs, APm, APl, ...}.

  `data`: the eval split, its canvases and normalisation; `num_select`: detections per image
  (`config.model.num_select`); `max_batches`: stop early (smoke runs)."""

  def __init__(self, model, data: datasets.DataConfig, num_select: int, workdir=None,
               max_batches: Optional[int] = None):
    self.data = data
    self.workdir = as_path(workdir) if workdir else None
    self.max_batches = max_batches
    self._predict = functools.partial(jit_predict, model, num_select=num_select)
    self.label_to_category = datasets.label_to_category_id(data)
    self._gt = None

  @property
  def ground_truth(self):
    if self._gt is None:
      self._gt = datasets.coco_ground_truth(self.data)
    return self._gt

  def predict(self, variables):
    """(COCO result dicts, ids of the images evaluated) of this evaluation (all processes).

    Images the input pipeline could not use (unreadable data) are not among the ids: the COCO
    evaluation is restricted to the ids, so they are reported (input counts) instead of being
    scored as missed detections.
    """
    iterator = iterators.make_eval_iterator(self.data, jax.process_index(), jax.process_count())
    detections, evaluated = [], set()
    for i, batch in enumerate(iterator):
      if self.max_batches is not None and i >= self.max_batches:
        break
      out = self._predict(variables, batch["image"], batch["pixel_valid"], batch["image_size"],
                          batch["orig_size"])
      host = dict(image_id=batch["image_id"], example_valid=batch["example_valid"],
                  **jax.device_get(out))
      host = _allgather(host)
      valid = host["valid"] & host["example_valid"][:, None]
      detections += detections_to_coco(host["image_id"], host["scores"], host["labels"],
                                       host["boxes"], valid, self.label_to_category)
      evaluated.update(int(i) for i in
                       np.asarray(host["image_id"])[np.asarray(host["example_valid"], bool)])
    iterators.log_stats(iterator, prefix="evaluation input")
    return detections, evaluated

  def run(self, variables, step: Optional[int] = None) -> Dict[str, float]:
    start = time.time()
    detections, evaluated = self.predict(variables)
    metrics = coco_evaluate(self.ground_truth, detections, image_ids=evaluated)
    summary = metrics.pop("summary")
    metrics.update(num_images=len(evaluated), eval_seconds=time.time() - start,
                   num_detections=len(detections))
    if self.workdir is not None and jax.process_index() == 0:
      out = self.workdir / "eval"
      out.mkdir(parents=True, exist_ok=True)
      tag = f"step_{step}" if step is not None else "final"
      (out / f"{tag}_detections.json").write_text(json.dumps(detections))
      (out / f"{tag}_metrics.json").write_text(json.dumps(metrics, indent=1))
      (out / f"{tag}_summary.txt").write_text(summary + "\n" + format_table(metrics) + "\n")
    # One line here; the scripts print the table once, the full pycocotools summary is in
    # eval/<tag>_summary.txt.
    logging.info("COCO eval (step %s): %s on %d images in %.0f s", step,
                 " ".join(f"{k} {100 * metrics[k]:.1f}" for k in METRIC_NAMES), len(evaluated),
                 metrics["eval_seconds"])
    return metrics
