"""Parity stages of the training objective, for check_parity.py (decisions §8).

Each `compare_*` function reads a reference directory laid out like /work/shared/parity/public
and returns rows `StageRow(stage, max_error, tolerance, passed)`; `passed` is None when the
stage is skipped (its arrays are absent; the stage name says why). Index stages report the number
of mismatches with tolerance 0; loss stages the max relative error with rtol 1e-4.

What the reference data allows (parity/README §7, training_extras.md §6):
  * `foreground_labels.npz`: labels exact, select loss (with `fg_score` of losses_train.npz);
  * `losses_train.npz` (DN off): no `aux_pred_logits`, so only the final and enc matchings and
    their losses, select_loss and the DN placeholder are compared;
  * `dn_train.npz` (DN on, top-k teacher-forced): all 7 matchings, all 40 terms and the total,
    and the CDN queries built from the recorded draws.
Matchings are computed (Hungarian on device), never forced.
"""

import functools
import math
import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import jax
import numpy as np

from focus_detr_jax.train import criterion as criterion_lib
from focus_detr_jax.train import denoising as denoising_lib
from focus_detr_jax.train import foreground as foreground_lib

LOSS_RTOL = 1e-4
DN_BOX_ATOL = 1e-5
MATCH_NAMES = ("final", "aux0", "aux1", "aux2", "aux3", "aux4", "enc")
_OUTPUT_KEYS = ("pred_logits", "pred_boxes", "aux_pred_logits", "aux_pred_boxes",
                "enc_pred_logits", "enc_pred_boxes", "fg_score")


class StageRow(NamedTuple):
  """One line of the parity report."""
  stage: str
  max_error: float
  tolerance: float
  passed: Optional[bool]  # None = skipped


def _skipped(stage: str, why: str) -> StageRow:
  return StageRow(f"{stage} (skipped: {why})", math.nan, math.nan, None)


def _load(parity_dir, name) -> Optional[Dict[str, np.ndarray]]:
  path = Path(parity_dir) / name
  if not path.exists():
    return None
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def load_targets(parity_dir, max_boxes: int = 100) -> Optional[Dict[str, np.ndarray]]:
  """The train batch's targets from inputs.npz, padded to `max_boxes` slots (numpy).

  Returns None when inputs.npz is absent. Keys: boxes [B, M, 4] float32 cxcywh, labels [B, M]
  int32, box_valid [B, M] bool, image_size [B, 2] int32 (h, w).
  """
  inputs = _load(parity_dir, "inputs.npz")
  if inputs is None:
    return None
  sizes = inputs["train_image_sizes"].astype(np.int32)
  batch = sizes.shape[0]
  boxes = np.zeros((batch, max_boxes, 4), np.float32)
  labels = np.zeros((batch, max_boxes), np.int32)
  valid = np.zeros((batch, max_boxes), bool)
  for i in range(batch):
    b = inputs[f"gt_boxes_cxcywh_{i}"]
    boxes[i, :len(b)] = b
    labels[i, :len(b)] = inputs[f"gt_labels_{i}"]
    valid[i, :len(b)] = True
  return {"boxes": boxes, "labels": labels, "box_valid": valid, "image_size": sizes}


def _rel_error(ours, ref) -> float:
  ours, ref = float(ours), float(ref)
  return abs(ours - ref) / abs(ref) if ref != 0 else abs(ours - ref)


def _level_shapes(ref) -> Tuple[Tuple[int, int], ...]:
  return tuple(tuple(int(v) for v in hw) for hw in ref["spatial_shapes"])


@functools.lru_cache(maxsize=None)
def _jitted_loss(level_shapes):
  return jax.jit(functools.partial(criterion_lib.focus_detr_loss, level_shapes=level_shapes))


@functools.lru_cache(maxsize=None)
def _jitted_cdn(dn_number: int, num_queries: int):
  return jax.jit(functools.partial(
      denoising_lib.build_cdn_queries, dn_number=dn_number, num_queries=num_queries,
      label_noise_ratio=0.5, box_noise_scale=1.0, batch_group_size=2))


def recorded_cdn_queries(ref, targets, dn_number: int = 100,
                         num_queries: int = 900) -> denoising_lib.DenoisingQueries:
  """CDN queries of dn_train.npz's run, rebuilt from its recorded draws (config values)."""
  batch = targets["labels"].shape[0]
  draws = denoising_lib.cdn_draws_from_detrex_rows(ref, batch, 2 * dn_number)
  return _jitted_cdn(dn_number, num_queries)(targets["labels"], targets["boxes"],
                                             targets["box_valid"], draws)


@functools.lru_cache(maxsize=4)
def _evaluate(parity_dir: str, npz_name: str, max_boxes: int):
  """Run the criterion on one reference file's stored outputs (cached across compare_*).

  Returns (ref, aux, total, num_aux) or None when a needed file or array is absent.
  """
  ref = _load(parity_dir, npz_name)
  targets = load_targets(parity_dir, max_boxes)
  if ref is None or targets is None:
    return None
  needed = [k for k in _OUTPUT_KEYS if k != "aux_pred_logits"] + ["spatial_shapes"]
  if any(k not in ref for k in needed):
    return None
  outputs = {k: ref[k] for k in _OUTPUT_KEYS if k in ref}
  if "aux_pred_logits" not in ref:
    # losses_train.npz stores no aux logits: evaluate without aux heads (final, enc, select).
    outputs["aux_pred_logits"] = np.zeros((0,) + ref["pred_logits"].shape, np.float32)
    outputs["aux_pred_boxes"] = np.zeros((0,) + ref["pred_boxes"].shape, np.float32)
  dn = None
  if "dn_pred_logits_all_layers" in ref and "draw0_label_flip_p" in ref:
    dn = recorded_cdn_queries(ref, targets, num_queries=ref["pred_logits"].shape[1])
    outputs["dn_pred_logits"] = ref["dn_pred_logits_all_layers"]
    outputs["dn_pred_boxes"] = ref["dn_pred_boxes_all_layers"]
  num_boxes = float(max(1, targets["box_valid"].sum()))
  total, aux = _jitted_loss(_level_shapes(ref))(outputs, targets, num_boxes, dn=dn)
  return ref, jax.device_get(aux), float(total), outputs["aux_pred_logits"].shape[0]


def compare_foreground_labels(parity_dir, max_boxes: int = 100) -> List[StageRow]:
  """Foreground labels exact (foreground_labels.npz) and the unweighted select loss (rtol 1e-4)."""
  stage = "foreground_labels"
  ref = _load(parity_dir, "foreground_labels.npz")
  targets = load_targets(parity_dir, max_boxes)
  if ref is None or targets is None:
    return [_skipped(stage, "foreground_labels.npz or inputs.npz absent")]
  level_shapes = tuple(tuple(int(v) for v in hw) for hw in ref["feat_shapes"])
  labels = np.asarray(foreground_lib.foreground_labels(
      targets["boxes"], targets["box_valid"], targets["image_size"], level_shapes,
      tuple(int(s) for s in ref["strides"]), tuple(tuple(r) for r in ref["limit_range"].tolist())))
  mismatches = int(np.sum(labels != ref["labels_flat"]))
  rows = [StageRow(stage, float(mismatches), 0.0, mismatches == 0)]
  train = _load(parity_dir, "losses_train.npz")
  if train is None or "fg_score" not in train:
    rows.append(_skipped("select_loss", "fg_score of losses_train.npz absent"))
    return rows
  per_image = np.asarray(foreground_lib.select_loss_per_image(train["fg_score"], labels))
  err = max(max(_rel_error(o, r) for o, r in zip(per_image, ref["select_loss_per_image"])),
            _rel_error(per_image.mean(), ref["select_loss"]))
  rows.append(StageRow("select_loss (per image and mean)", err, LOSS_RTOL, err <= LOSS_RTOL))
  return rows


def _match_rows(result, npz_name: str) -> List[StageRow]:
  ref, aux, _, num_aux = result
  names = ("final",) + MATCH_NAMES[1:1 + num_aux] + ("enc",)
  query_index = np.asarray(aux["matching"].query_index)  # [calls, B, M]
  matched = np.asarray(aux["matching"].matched)
  rows = []
  for k, name in enumerate(names):
    stage = f"{npz_name} match_{name}"
    batch = query_index.shape[1]
    if any(f"match_{name}_src_{i}" not in ref for i in range(batch)):
      rows.append(_skipped(stage, "reference indices absent"))
      continue
    mismatches = 0
    for i in range(batch):
      ours = {(int(query_index[k, i, m]), m) for m in np.nonzero(matched[k, i])[0]}
      theirs = set(zip(ref[f"match_{name}_src_{i}"].tolist(),
                       ref[f"match_{name}_tgt_{i}"].tolist()))
      mismatches += len(ours ^ theirs)
    rows.append(StageRow(stage, float(mismatches), 0.0, mismatches == 0))
  for name in MATCH_NAMES[1 + num_aux:-1]:
    rows.append(_skipped(f"{npz_name} match_{name}", "aux_pred_logits absent"))
  return rows


def compare_matchings(parity_dir, max_boxes: int = 100) -> List[StageRow]:
  """The Hungarian matchings of losses_train.npz (final, enc) and dn_train.npz (all 7), exact.

  The mismatch count is the size of the symmetric difference of the (query, target) pair sets.
  """
  rows = []
  for npz_name in ("losses_train.npz", "dn_train.npz"):
    result = _evaluate(str(parity_dir), npz_name, max_boxes)
    if result is None:
      rows.append(_skipped(f"{npz_name} matchings", "file or stored outputs absent"))
      continue
    rows += _match_rows(result, npz_name)
  return rows


def compare_loss_terms(parity_dir, max_boxes: int = 100) -> List[StageRow]:
  """Every loss term that the stored outputs determine, and the weighted total (rtol 1e-4).

  One row per file for the terms (the worst term named) and one for the total; for
  losses_train.npz the aux terms and the total are skipped (no aux logits stored).
  """
  rows = []
  for npz_name in ("losses_train.npz", "dn_train.npz"):
    result = _evaluate(str(parity_dir), npz_name, max_boxes)
    if result is None:
      rows.append(_skipped(f"{npz_name} loss terms", "file or stored outputs absent"))
      continue
    ref, aux, total, _ = result
    ref_raw = dict(zip((str(n) for n in ref["loss_names"]), ref["loss_raw"]))
    errors = {n: _rel_error(aux["losses"][n], r) for n, r in ref_raw.items() if n in aux["losses"]}
    missing = len(ref_raw) - len(errors)
    worst = max(errors, key=errors.get)
    stage = f"{npz_name} loss terms ({len(errors)}/{len(ref_raw)}, worst {worst})"
    rows.append(StageRow(stage, errors[worst], LOSS_RTOL, errors[worst] <= LOSS_RTOL))
    if missing:
      rows.append(_skipped(f"{npz_name} total", f"{missing} terms need aux_pred_logits"))
    else:
      err = _rel_error(total, ref["loss_total"])
      rows.append(StageRow(f"{npz_name} total", err, LOSS_RTOL, err <= LOSS_RTOL))
  return rows


def compare_denoising(parity_dir, max_boxes: int = 100) -> List[StageRow]:
  """CDN queries from the recorded draws vs dn_train.npz: labels, indices and mask exact, boxes
  atol 1e-5 (XLA may contract the corner update into an FMA, so not always bitwise)."""
  ref = _load(parity_dir, "dn_train.npz")
  targets = load_targets(parity_dir, max_boxes)
  if ref is None or targets is None or "draw0_label_flip_p" not in ref:
    return [_skipped("dn queries", "dn_train.npz draws or inputs.npz absent")]
  dn = jax.device_get(recorded_cdn_queries(ref, targets, num_queries=ref["pred_logits"].shape[1]))
  image, slot = ref["dn_known_bid"], ref["dn_map_known_indice"]
  rows = []

  def exact(stage, ours, theirs):
    bad = int(np.sum(np.asarray(ours) != np.asarray(theirs)))
    rows.append(StageRow(stage, float(bad), 0.0, bad == 0))

  def close(stage, ours, theirs, atol):
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
    rows.append(StageRow(stage, err, atol, err <= atol))

  exact("dn num_groups / pad_size",
        np.concatenate([dn.num_groups, dn.pad_size, dn.group_width]),
        np.concatenate([np.full_like(dn.num_groups, ref["dn_num_groups"]),
                        np.full_like(dn.pad_size, ref["dn_pad_size"]),
                        np.full_like(dn.group_width, ref["dn_meta_single_padding"])]))
  exact("dn noised labels", dn.dn_labels[image, slot], ref["dn_known_labels_noised"])
  close("dn noised boxes cxcywh", dn.dn_boxes[image, slot], ref["dn_known_bbox_noised_cxcywh"],
        DN_BOX_ATOL)
  close("dn input_query_bbox", dn.dn_boxes_unact, ref["input_query_bbox"], DN_BOX_ATOL)
  exact("dn filled slots", dn.dn_valid, np.any(ref["input_query_label"] != 0, axis=-1))
  size = ref["attn_mask"].shape[0]
  exact("dn attn_mask", dn.dn_attn_mask[:, :size, :size],
        np.broadcast_to(ref["attn_mask"], (dn.dn_attn_mask.shape[0], size, size)))
  bad = 0
  for i in range(dn.dn_positive.shape[0]):
    ours = {(int(s), int(dn.dn_target_index[i, s])) for s in np.nonzero(dn.dn_positive[i])[0]}
    theirs = set(zip(ref[f"dn_match_src_{i}"].tolist(), ref[f"dn_match_tgt_{i}"].tolist()))
    bad += len(ours ^ theirs)
  rows.append(StageRow("dn positive slots -> targets", float(bad), 0.0, bad == 0))
  return rows


def loss_stage_rows(parity_dir=None, max_boxes: int = 100) -> List[StageRow]:
  """All rows of this module, in pipeline order."""
  parity_dir = parity_dir or os.environ.get("FOCUS_DETR_PARITY_DIR")
  if parity_dir is None:
    raise ValueError("no parity directory given")
  return (compare_foreground_labels(parity_dir, max_boxes)
          + compare_denoising(parity_dir, max_boxes)
          + compare_matchings(parity_dir, max_boxes)
          + compare_loss_terms(parity_dir, max_boxes))
