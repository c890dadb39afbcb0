"""Parity stages of the training objective (decisions §8).

`compare_*` / `criterion_only_stages`: the criterion on the outputs stored in a reference directory
(the `criterion/` rows of check_parity.py; losses_train.npz stores no `aux_pred_logits`, so only
its final and enc matchings and losses are compared); `passed` is None when a row is skipped.
`train_loss_stages`, `dn_stages`, `gradient_stages`: our own teacher-forced forward + criterion
(DN off, on) and its gradients. Matchings are computed (Hungarian on device), never forced.
"""

import dataclasses
import functools
import math
import operator
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.convert import detrex as detrex_convert
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.parity.compare import (TOL_DEC_BOXES, TOL_DEC_LOGITS, TOL_DN_BOX,
                                           TOL_GRAD_MAX, TOL_GRAD_NORM, TOL_GRAD_NORM_ATOL,
                                           TOL_GRAD_REL_L2, TOL_LOSS, TOL_MODULE, StageResult,
                                           compare_close, compare_exact)
from focus_detr_jax.parity.reference import (backbone_mapper, build_model, forced_from, load_npz,
                                             make_batch)
from focus_detr_jax.train import criterion as criterion_lib
from focus_detr_jax.train import denoising as denoising_lib
from focus_detr_jax.train import foreground as foreground_lib
from focus_detr_jax.train.objective import Objective, model_loss

MATCH_NAMES = ("final", "aux0", "aux1", "aux2", "aux3", "aux4", "enc")
_OUTPUT_KEYS = ("pred_logits", "pred_boxes", "aux_pred_logits", "aux_pred_boxes",
                "enc_pred_logits", "enc_pred_boxes", "fg_score")


def _row(stage: str, error: float, tolerance: float, passed: bool) -> StageResult:
  return StageResult(stage, error, f"{tolerance:g}", passed)


def _skipped(stage: str, why: str) -> StageResult:
  return StageResult(f"{stage} (skipped: {why})", math.nan, "", None)


def load_targets(parity_dir, max_boxes: int = 100) -> Optional[Dict[str, np.ndarray]]:
  """The train batch's targets from inputs.npz (None when absent), padded to M = `max_boxes`:
  boxes [B, M, 4] float32 cxcywh, labels [B, M] int32, box_valid [B, M], image_size [B, 2]."""
  inputs = load_npz(Path(parity_dir) / "inputs.npz")
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


def _int_tuples(rows) -> Tuple[Tuple[int, ...], ...]:
  """A 2-d array as hashable static arguments."""
  return tuple(tuple(int(v) for v in row) for row in rows)


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
  """The criterion on one reference file's stored outputs (cached across compare_*): (ref, aux,
  total, num_aux), or None when a needed file or array is absent."""
  ref = load_npz(Path(parity_dir) / npz_name)
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
  total, aux = _jitted_loss(_int_tuples(ref["spatial_shapes"]))(outputs, targets, num_boxes, dn=dn)
  return ref, jax.device_get(aux), float(total), outputs["aux_pred_logits"].shape[0]


def compare_foreground_labels(parity_dir, max_boxes: int = 100) -> List[StageResult]:
  """Foreground labels exact (foreground_labels.npz) and the unweighted select loss (rtol 1e-4)."""
  stage = "foreground_labels"
  ref = load_npz(Path(parity_dir) / "foreground_labels.npz")
  targets = load_targets(parity_dir, max_boxes)
  if ref is None or targets is None:
    return [_skipped(stage, "foreground_labels.npz or inputs.npz absent")]
  labels = np.asarray(foreground_lib.foreground_labels(
      targets["boxes"], targets["box_valid"], targets["image_size"],
      _int_tuples(ref["feat_shapes"]), tuple(int(s) for s in ref["strides"]),
      _int_tuples(ref["limit_range"])))
  mismatches = int(np.sum(labels != ref["labels_flat"]))
  rows = [_row(stage, float(mismatches), 0.0, mismatches == 0)]
  train = load_npz(Path(parity_dir) / "losses_train.npz")
  if train is None or "fg_score" not in train:
    rows.append(_skipped("select_loss", "fg_score of losses_train.npz absent"))
    return rows
  per_image = np.asarray(foreground_lib.select_loss_per_image(train["fg_score"], labels))
  err = max(max(_rel_error(o, r) for o, r in zip(per_image, ref["select_loss_per_image"])),
            _rel_error(per_image.mean(), ref["select_loss"]))
  rows.append(_row("select_loss (per image and mean)", err, TOL_LOSS, err <= TOL_LOSS))
  return rows


def _matched_pairs(query_index, matched):
  """Our (query, target) pairs of one matching call and image."""
  return [(int(query_index[t]), int(t)) for t in np.nonzero(np.asarray(matched))[0]]


def _pair_mismatches(ours, src, tgt) -> int:
  """Size of the symmetric difference of two (query, target) pair sets."""
  return len(set(ours) ^ set(zip(src.tolist(), tgt.tolist())))


def _per_file(parity_dir, max_boxes, what, rows_fn) -> List[StageResult]:
  """rows_fn(criterion result, npz name) for losses_train.npz and dn_train.npz."""
  rows = []
  for npz_name in ("losses_train.npz", "dn_train.npz"):
    result = _evaluate(str(parity_dir), npz_name, max_boxes)
    rows += ([_skipped(f"{npz_name} {what}", "file or stored outputs absent")] if result is None
             else rows_fn(result, npz_name))
  return rows


def _match_rows(result, npz_name: str) -> List[StageResult]:
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
    mismatches = sum(_pair_mismatches(_matched_pairs(query_index[k, i], matched[k, i]),
                                      ref[f"match_{name}_src_{i}"], ref[f"match_{name}_tgt_{i}"])
                     for i in range(batch))
    rows.append(_row(stage, float(mismatches), 0.0, mismatches == 0))
  for name in MATCH_NAMES[1 + num_aux:-1]:
    rows.append(_skipped(f"{npz_name} match_{name}", "aux_pred_logits absent"))
  return rows


def compare_matchings(parity_dir, max_boxes: int = 100) -> List[StageResult]:
  """The Hungarian matchings of losses_train.npz (final, enc) and dn_train.npz (all 7), exact
  (the count of (query, target) pairs in one set only)."""
  return _per_file(parity_dir, max_boxes, "matchings", _match_rows)


def compare_loss_terms(parity_dir, max_boxes: int = 100) -> List[StageResult]:
  """Per file, every loss term that the stored outputs determine (the worst named) and the
  weighted total, rtol 1e-4 (losses_train.npz: no aux logits stored, so no total)."""
  return _per_file(parity_dir, max_boxes, "loss terms", _loss_term_rows)


def _loss_term_rows(result, npz_name: str) -> List[StageResult]:
  ref, aux, total, _ = result
  ref_raw = dict(zip((str(n) for n in ref["loss_names"]), ref["loss_raw"]))
  errors = {n: _rel_error(aux["losses"][n], r) for n, r in ref_raw.items() if n in aux["losses"]}
  missing = len(ref_raw) - len(errors)
  worst = max(errors, key=errors.get)
  stage = f"{npz_name} loss terms ({len(errors)}/{len(ref_raw)}, worst {worst})"
  rows = [_row(stage, errors[worst], TOL_LOSS, errors[worst] <= TOL_LOSS)]
  if missing:
    return rows + [_skipped(f"{npz_name} total", f"{missing} terms need aux_pred_logits")]
  err = _rel_error(total, ref["loss_total"])
  return rows + [_row(f"{npz_name} total", err, TOL_LOSS, err <= TOL_LOSS)]


def compare_denoising(parity_dir, max_boxes: int = 100) -> List[StageResult]:
  """CDN queries from the recorded draws vs dn_train.npz: labels, indices and mask exact, boxes
  atol 1e-5 (XLA may contract the corner update into an FMA, so not always bitwise)."""
  ref = load_npz(Path(parity_dir) / "dn_train.npz")
  targets = load_targets(parity_dir, max_boxes)
  if ref is None or targets is None or "draw0_label_flip_p" not in ref:
    return [_skipped("dn queries", "dn_train.npz draws or inputs.npz absent")]
  dn = jax.device_get(recorded_cdn_queries(ref, targets, num_queries=ref["pred_logits"].shape[1]))
  image, slot = ref["dn_known_bid"], ref["dn_map_known_indice"]
  rows = []

  def exact(stage, ours, theirs):
    bad = int(np.sum(np.asarray(ours) != np.asarray(theirs)))
    rows.append(_row(stage, float(bad), 0.0, bad == 0))

  def close(stage, ours, theirs, atol):
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))
    rows.append(_row(stage, err, atol, err <= atol))

  exact("dn num_groups / pad_size",
        np.concatenate([dn.num_groups, dn.pad_size, dn.group_width]),
        np.concatenate([np.full_like(dn.num_groups, ref["dn_num_groups"]),
                        np.full_like(dn.pad_size, ref["dn_pad_size"]),
                        np.full_like(dn.group_width, ref["dn_meta_single_padding"])]))
  exact("dn noised labels", dn.dn_labels[image, slot], ref["dn_known_labels_noised"])
  close("dn noised boxes cxcywh", dn.dn_boxes[image, slot], ref["dn_known_bbox_noised_cxcywh"],
        TOL_DN_BOX)
  close("dn input_query_bbox", dn.dn_boxes_unact, ref["input_query_bbox"], TOL_DN_BOX)
  exact("dn filled slots", dn.dn_valid, np.any(ref["input_query_label"] != 0, axis=-1))
  size = ref["attn_mask"].shape[0]
  exact("dn attn_mask", dn.dn_attn_mask[:, :size, :size],
        np.broadcast_to(ref["attn_mask"], (dn.dn_attn_mask.shape[0], size, size)))
  bad = sum(_pair_mismatches(
      [(int(s), int(dn.dn_target_index[i, s])) for s in np.nonzero(dn.dn_positive[i])[0]],
      ref[f"dn_match_src_{i}"], ref[f"dn_match_tgt_{i}"]) for i in range(dn.dn_positive.shape[0]))
  rows.append(_row("dn positive slots -> targets", float(bad), 0.0, bad == 0))
  return rows


# ------------------------------------------------------------------------------------------------
# Training objective: our model forward (teacher-forced) + criterion, with DN off and on, and the
# gradients of the total loss.

def _loss_rows(tag, ref, aux):
  names = [str(n) for n in ref["loss_names"]]
  ours, theirs = np.asarray([float(aux["losses"][n]) for n in names]), ref["loss_raw"]
  worst = names[int(np.argmax(np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-30)))]
  total = sum(float(aux["weighted"][n]) for n in names)
  m = aux["matching"]
  bad = sum(_pair_mismatches(_matched_pairs(m.query_index[k, b], m.matched[k, b]),
                             ref[f"match_{name}_src_{b}"], ref[f"match_{name}_tgt_{b}"]) > 0
            for k, name in enumerate(MATCH_NAMES) for b in range(m.query_index.shape[1])
            if f"match_{name}_src_{b}" in ref)
  return [compare_close(f"{tag}/loss_terms ({len(names)})", ours, theirs, rtol=TOL_LOSS,
                        detail=f"worst: {worst}"),
          compare_close(f"{tag}/loss_total", total, ref["loss_total"], rtol=TOL_LOSS),
          StageResult(f"{tag}/hungarian_matchings (7 calls x images)", float(bad), "exact",
                      bad == 0)]


_OBJECTIVE_CACHE = {}


def _loss_fn(reference, config, with_dn):
  """(variables, loss_fn(params) -> (total, aux)) of one recorded train run, top-k's forced."""
  ref = reference["dn_train"] if with_dn else reference["losses_train"]
  config = config.copy_and_resolve_references()
  if not with_dn:
    config.model.dn_number = 0
  images, pixel_valid, _ = make_batch(reference["inputs"], prefix="train_")
  batch = dict(image=jnp.asarray(images), pixel_valid=jnp.asarray(pixel_valid),
               **{k: jnp.asarray(v) for k, v in load_targets(
                   reference["dir"], config.data.max_boxes).items()})
  model, variables = build_model(config, reference["dir"], train=True)
  forced = forced_from(ref, config.model.num_encoder_layers)
  draws = None
  if with_dn:
    draws = denoising_lib.cdn_draws_from_detrex_rows(ref, batch["image"].shape[0],
                                                     2 * config.model.dn_number)
  extra = {k: v for k, v in variables.items() if k != "params"}
  objective = Objective.from_config(config)
  return variables, lambda params: model_loss(model, params, extra, batch, objective,
                                              dn_draws=draws, forced=forced)


def run_objective(reference, config, with_dn):
  """Loss parts and gradients of one recorded train run, one compiled program (cached)."""
  key = (str(reference["dir"]), with_dn)
  if key not in _OBJECTIVE_CACHE:
    variables, loss_fn = _loss_fn(reference, config, with_dn)
    (_, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
    _OBJECTIVE_CACHE.clear()  # keep one full-size result alive at a time
    _OBJECTIVE_CACHE[key] = (variables, jax.device_get(aux), jax.device_get(grads))
  return _OBJECTIVE_CACHE[key]


def train_loss_stages(reference, config):
  """DN-off losses and matchings of losses_train.npz from our teacher-forced forward."""
  _, aux, _ = run_objective(reference, config, with_dn=False)
  return _loss_rows("train_dn_off", reference["losses_train"], aux)


def dn_stages(reference, config):
  """DN-on run of dn_train.npz: queries, mask, DN decoder outputs, losses, matchings."""
  ref = reference["dn_train"]
  variables, aux, _ = run_objective(reference, config, with_dn=True)
  dn, out = aux["denoising"], aux["outputs"]
  label_enc = np.asarray(variables["params"]["label_enc"])
  query_label = np.where(np.asarray(dn.dn_valid)[..., None], label_enc[np.asarray(dn.dn_labels)],
                         0.0)
  s = ref["input_query_label"].shape[1]
  rows = [
      compare_close("train_dn_on/input_query_label", query_label[:, :s], ref["input_query_label"],
                    atol=1e-6),
      compare_close("train_dn_on/input_query_bbox", np.asarray(dn.dn_boxes_unact)[:, :s],
                    ref["input_query_bbox"], atol=TOL_MODULE),
      compare_exact("train_dn_on/num_groups", np.asarray(dn.num_groups),
                    np.full_like(np.asarray(dn.num_groups), int(ref["dn_num_groups"]))),
  ]
  # Our mask has the static capacity S = 2 * dn_number; detrex's has pad_size DN slots.
  mask = np.asarray(dn.dn_attn_mask)
  total_q = ref["attn_mask"].shape[0]
  q = out["pred_logits"].shape[1]
  keep = np.r_[0:total_q - q, mask.shape[1] - q:mask.shape[1]]
  for b in range(mask.shape[0]):
    rows.append(compare_exact(f"train_dn_on/attn_mask_img{b}", mask[b][np.ix_(keep, keep)],
                              ref["attn_mask"]))
  decoder = [("dn_pred_logits_all_layers", out["dn_pred_logits"][:, :, :s], TOL_DEC_LOGITS),
             ("dn_pred_boxes_all_layers", out["dn_pred_boxes"][:, :, :s], TOL_DEC_BOXES)]
  decoder += [(k, out[k], TOL_DEC_LOGITS if k.endswith("logits") else TOL_DEC_BOXES)
              for k in ("pred_logits", "pred_boxes", "aux_pred_logits", "aux_pred_boxes")]
  rows += [compare_close(f"train_dn_on/{k}", ours, ref[k], atol=tol) for k, ours, tol in decoder]
  rows += _loss_rows("train_dn_on", ref, aux)
  return rows


def gradient_stages(reference, config, with_dn):
  """Gradients of the total loss vs grads_train(_dn).npz: norms per parameter, full arrays."""
  tag = "grads_dn_on" if with_dn else "grads_dn_off"
  grads_ref = reference["grads_train_dn" if with_dn else "grads_train"]
  _, _, grads = run_objective(reference, config, with_dn)
  names = [str(n) for n in grads_ref["param_names"]]
  model = FocusDETR.from_config(config.model)
  ours = detrex_convert.variables_to_state_dict(
      {"params": grads}, names, model.num_decoder_layers, model.num_encoder_layers,
      backbone_mapper=backbone_mapper(model))
  ref_norm = grads_ref["grad_stats"][:, 2]
  our_norm = np.asarray([np.linalg.norm(ours[n].astype(np.float64)) for n in names])
  small = ref_norm < 1e-6
  err = np.abs(our_norm - ref_norm)
  ok = np.where(small, err <= TOL_GRAD_NORM_ATOL, err <= TOL_GRAD_NORM * ref_norm)
  rel = np.where(small, 0.0, err / np.maximum(ref_norm, 1e-30))
  worst = int(np.argmax(rel))
  rows = [StageResult(f"{tag}/grad_norms ({len(names)} params)", float(rel.max()),
                      f"rtol {TOL_GRAD_NORM:g} (atol {TOL_GRAD_NORM_ATOL:g} if norm<1e-6)",
                      bool(ok.all()), f"worst rel {names[worst]}; {int((~ok).sum())} failing: " +
                      ", ".join(np.asarray(names)[~ok][:5]))]
  # Our param tree must hold exactly the reference's trainable parameters.
  ours_count = len(jax.tree_util.tree_leaves(grads))
  rows.append(compare_exact(f"{tag}/trainable_param_count", ours_count, len(names) + len(
      grads_ref["frozen_param_names"])))
  for frozen in grads_ref["frozen_param_names"]:
    rule = detrex_convert.detrex_key_to_path(str(frozen))
    node = functools.reduce(operator.getitem, tuple(rule[1]) + (rule[3],), grads)
    rows.append(compare_exact(f"{tag}/frozen {frozen} grad == 0", np.asarray(node),
                              np.zeros_like(np.asarray(node))))
  for key in sorted(k for k in grads_ref if k.startswith("grad__")):
    name = key[len("grad__"):]
    g_ref = grads_ref[key].astype(np.float64)
    g = ours[name].astype(np.float64)
    rel_l2 = np.linalg.norm(g - g_ref) / max(np.linalg.norm(g_ref), 1e-30)
    max_rel = np.abs(g - g_ref).max() / max(np.abs(g_ref).max(), 1e-30)
    rows.append(StageResult(f"{tag}/grad {name}", float(rel_l2),
                            f"rel L2 {TOL_GRAD_REL_L2:g}, max {TOL_GRAD_MAX:g}",
                            bool(rel_l2 <= TOL_GRAD_REL_L2 and max_rel <= TOL_GRAD_MAX),
                            f"max diff / max abs {max_rel:.2e}"))
  return rows


def criterion_only_stages(reference_dir, max_boxes: int = 100):
  """The criterion on the stored outputs (`compare_*`, in pipeline order), skipped rows left out."""
  rows = [r for compare in (compare_foreground_labels, compare_denoising, compare_matchings,
                            compare_loss_terms) for r in compare(reference_dir, max_boxes)]
  return [dataclasses.replace(r, stage=f"criterion/{r.stage}") for r in rows
          if r.passed is not None]
