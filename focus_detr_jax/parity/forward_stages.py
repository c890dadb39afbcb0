"""Forward-pass parity stages: the eval and train forwards of a recorded set, the deformable
attention, and the post-processed detections (decisions §8).

A comparison whose arrays are absent from a (partial) directory is listed as skipped. Downstream
of every data-dependent top-k the reference indices are teacher-forced; the top-k's themselves are
compared tie-aware against our own (unforced) selection from our own keys. `run_all` runs every
stage group that a directory's files allow (these and those of `loss_stages.py`).
"""

import functools
from typing import List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.models.deformable_attention import MultiScaleDeformableAttention, ms_deform_attn
from focus_detr_jax.models.postprocess import postprocess
from focus_detr_jax.parity.compare import (TOL_BACKBONE, TOL_DEC_BOXES, TOL_DEC_LOGITS,
                                           TOL_DET_SCORES, TOL_FG, TOL_MC, TOL_MEMORY, TOL_MODULE,
                                           StageResult, compare_close, compare_detections,
                                           compare_exact, compare_topk, detection_box_errors,
                                           float64_arbitration)
from focus_detr_jax.parity.loss_stages import (criterion_only_stages, dn_stages, gradient_stages,
                                               train_loss_stages)
from focus_detr_jax.parity.reference import (MissingReferenceArray, build_model,
                                             config_for_reference, float64_forward, forced_from,
                                             load_reference, make_batch, run_forward)


def _natural_topk(key, k):
  return np.argsort(-np.asarray(key, np.float64), axis=-1, kind="stable")[..., :k]


class _Stages:
  """Rows of one stage family; a comparison whose reference arrays are absent is listed as
  skipped (decisions §8: partial directories) instead of failing, or left out when `quiet`."""

  def __init__(self, tag, ref, skipped):
    self.tag, self.ref, self.skipped, self.rows = tag, ref, skipped, []

  def need(self, name, *keys):
    missing = [k for k in keys if k not in self.ref]
    if missing:
      self.skipped.append(f"{self.tag}/{name} (absent: {', '.join(missing)})")
    return not missing

  def add(self, row):
    self.rows.append(row)
    return row

  def check(self, compare, name, ours, key=None, quiet=False, **tol):
    """compare(ours, ref[key]) as the row `name`; key defaults to the name."""
    key = key or name
    if (key in self.ref) if quiet else self.need(name, key):
      self.add(compare(f"{self.tag}/{name}", ours, self.ref[key], **tol))

  def topk(self, name, ours_key, ref_key, eps):
    """Our own top-k of `ours_key`, tie-aware against the reference's indices `name`."""
    ref_idx = self.ref[name]
    return self.add(compare_topk(f"{self.tag}/{name}", _natural_topk(ours_key, ref_idx.shape[1]),
                                 ref_idx, ref_key, eps))


# Decoder outputs (decisions §8, revised): the stages the float64 arbitration may pass.
DECODER_OUTPUTS = (("pred_logits", TOL_DEC_LOGITS), ("aux_pred_logits", TOL_DEC_LOGITS),
                   ("pred_boxes", TOL_DEC_BOXES), ("aux_pred_boxes", TOL_DEC_BOXES),
                   ("inter_references", TOL_DEC_BOXES))
# Backbone stage names of the record (R50 / Swin) -> index of our backbone feature.
_BACKBONE_LEVELS = {"res3": 0, "res4": 1, "res5": 2, "p1": 0, "p2": 1, "p3": 2}


def _feature_stages(st, inter):
  """Backbone, neck and position embedding (eval records only; whatever levels they hold)."""
  close = functools.partial(st.check, compare_close)
  close("pos_embed_lvl0", inter["pos_embed"][0][0].transpose(2, 0, 1)[::8],
        key="pos_embed_lvl0_img0_ch8", atol=TOL_MODULE)
  for level, idx in _BACKBONE_LEVELS.items():
    f, name = inter["backbone_features"][idx], f"backbone_{level}"
    st.check(compare_exact, f"{name}_shape", np.asarray(f.shape)[[0, 3, 1, 2]], quiet=True)
    close(name, f[0].transpose(2, 0, 1)[::8], key=f"{name}_img0_ch8", quiet=True, **TOL_BACKBONE)
    close(f"{name}_chanmean", f.mean(axis=(1, 2)), quiet=True, **TOL_BACKBONE)
  for l, f in enumerate(inter["neck_features"]):
    close(f"neck_lvl{l}", f[0].transpose(2, 0, 1)[::2], key=f"neck_lvl{l}_img0_ch2", quiet=True,
          **TOL_BACKBONE)
    close(f"neck_lvl{l}_chanmean", f.mean(axis=(1, 2)), quiet=True, **TOL_BACKBONE)


def _encoder_layer_stages(st, inter, l):
  """The cascade's foreground top-k, OESM scores and selection, and the output of layer l."""
  ref, enc, close = st.ref, inter[f"encoder_layer{l}"], functools.partial(st.check, compare_close)
  if st.need(f"fg_inds_layer{l}", f"fg_inds_layer{l}", "fg_score_masked"):
    st.topk(f"fg_inds_layer{l}", inter["fg_score_masked"], ref["fg_score_masked"], TOL_FG)
  close(f"oesm_score_tgt_max_layer{l}", enc["score_max"], atol=TOL_FG)
  st.check(compare_exact, f"oesm_score_tgt_argmax_layer{l}", enc["score_argmax"])
  close(f"oesm_mc_score_layer{l}", enc["mc_score"], atol=TOL_MC)
  sel, mc = f"oesm_sel_local_layer{l}", f"oesm_mc_score_layer{l}"
  if st.need(sel, sel):
    row = st.topk(sel, enc["mc_score"], ref[mc] if mc in ref else enc["mc_score"], TOL_MC)
    if mc not in ref:
      # The record keeps only the selected scores: ties judged on our keys, which the
      # oesm_sel_mc_score row checks against the reference's.
      row.detail += "; ties on our keys (reference keys absent)"
  glob = f"oesm_sel_global_layer{l}"
  if st.need(glob, glob, f"fg_inds_layer{l}") and sel in ref:
    st.add(compare_exact(f"{st.tag}/{glob} (forced)", np.take_along_axis(
        ref[f"fg_inds_layer{l}"], enc["sel_local"], axis=1), ref[glob]))
  close(f"oesm_sel_mc_score_layer{l}",
        np.take_along_axis(enc["mc_score"], enc["sel_local"], axis=1), atol=TOL_MC)
  close(f"enc_layer{l}_out_rownorm", enc["out_rownorm"], rtol=1e-4)


def transformer_stages(tag, ref, outputs, inter, num_layers, full, skipped=None):
  """Stages shared by eval and train records (`full`: eval arrays, backbone, neck, ...); the
  names of those whose reference arrays are absent go to the list `skipped`."""
  st = _Stages(tag, ref, skipped if skipped is not None else [])
  close, exact = (functools.partial(st.check, c) for c in (compare_close, compare_exact))
  shapes = [f.shape[1:3] for f in inter["neck_features"]]
  exact("spatial_shapes", np.asarray(shapes))
  for k in ("valid_token_nums", "focus_token_nums"):
    exact(k, inter[k])
  if st.need("padding_mask_flat", "padding_mask_flat"):  # detrex's mask: True = padded
    st.add(compare_exact(f"{tag}/padding_mask_flat", inter["token_valid"],
                         ~np.asarray(ref["padding_mask_flat"], bool)))
  close("valid_ratios", inter["valid_ratios"], atol=TOL_MODULE)
  if full:
    _feature_stages(st, inter)
  starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])])
  close("fg_score", inter["fg_score"], atol=TOL_FG)
  close("fg_score_masked", inter["fg_score_masked"], atol=TOL_FG)
  for l in range(len(shapes)):
    close(f"fg_score_lvl{l}", inter["fg_score"][:, starts[l]:starts[l + 1]], quiet=True,
          atol=TOL_FG)
  close("fts_output_memory_rownorm", inter["fts_memory_rownorm"], rtol=1e-4)
  exact("enc_output_proposals_valid", inter["proposals_valid"])
  for l in range(num_layers):
    _encoder_layer_stages(st, inter, l)
  close("memory", inter["memory"], atol=TOL_MEMORY)
  close("memory_rownorm", np.linalg.norm(inter["memory"], axis=-1), rtol=1e-4)
  close("enc_outputs_class_max_all", inter["enc_outputs_class_max_all"], atol=TOL_MEMORY)
  if st.need("enc_topk_proposals", "enc_topk_proposals", "enc_outputs_class_max_all"):
    st.topk("enc_topk_proposals", inter["enc_outputs_class_max_all"],
            ref["enc_outputs_class_max_all"], TOL_MEMORY)
  for key, tol in (("enc_pred_logits", TOL_MEMORY), ("enc_pred_boxes", TOL_MEMORY),
                   ("init_reference", TOL_MEMORY)) + DECODER_OUTPUTS:
    close(key, outputs[key], atol=tol)
  # Fingerprint only; the decoder tolerance is on logits and boxes (reported, not gated).
  close("dec_hidden_rownorm", inter["dec_hidden_rownorm"], atol=TOL_DEC_LOGITS)
  return st.rows


def _detection_pairs(ref, outputs, image_sizes, num_select):
  """(stage suffix, ours, reference, (h, w)) for the post-processed detections the record holds:
  infer_* before detectron2's clipping, det_* after (only the kept, non-empty boxes)."""
  det = postprocess(jnp.asarray(outputs["pred_logits"]), jnp.asarray(outputs["pred_boxes"]),
                    jnp.asarray(image_sizes), num_select=num_select)
  det = jax.tree_util.tree_map(np.asarray, det)
  theirs = lambda prefix, i: dict(scores=ref[f"{prefix}_scores_{i}"],
                                 labels=ref[f"{prefix}_labels_{i}"],
                                 boxes=ref[f"{prefix}_boxes_xyxy_{i}"])
  pairs = []
  for i, (h, w) in enumerate(image_sizes):
    if f"infer_scores_{i}" in ref:
      cx, cy, bw, bh = outputs["pred_boxes"][i][det["query"][i]].T
      unclipped = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                            (cy + bh / 2) * h], -1)
      ours = dict(scores=det["scores"][i], labels=det["labels"][i], boxes=unclipped)
      pairs.append((f"infer_img{i}", ours, theirs("infer", i), (h, w)))
    if f"det_scores_{i}" in ref:
      ours = {k: det[k][i][det["valid"][i]] for k in ("scores", "labels", "boxes")}
      pairs.append((f"det_img{i}", ours, theirs("det", i), (h, w)))
  return pairs


def detection_stages(tag, ref, outputs, image_sizes, num_select):
  r = []
  for name, ours, theirs, size in _detection_pairs(ref, outputs, image_sizes, num_select):
    if len(ours["scores"]) != len(theirs["scores"]):
      r.append(StageResult(f"{tag}/{name} count", abs(len(ours["scores"]) -
                                                      len(theirs["scores"])), "exact", False))
    else:
      r += compare_detections(f"{tag}/{name}", ours, theirs, size)
  return r


def arbitrate_decoder_rows(tag, rows, ref, outputs32, outputs64, image_sizes, num_select):
  """`rows` with the float64 arbitration (decisions §8, revised) applied to the failing decoder
  outputs; outputs32/outputs64: our float32 / float64 outputs with every index forced."""
  by_stage = {f"{tag}/{key}": (key, tol) for key, tol in DECODER_OUTPUTS}
  pairs32 = {name: (o, t, size) for name, o, t, size in
             _detection_pairs(ref, outputs32, image_sizes, num_select)}
  pairs64 = {name: o for name, o, _, _ in
             _detection_pairs(ref, outputs64, image_sizes, num_select)}

  def arbitrate(row):
    if row.passed:
      return row
    if row.stage in by_stage:
      key, tol = by_stage[row.stage]
      return float64_arbitration(row, np.abs(outputs32[key] - ref[key]),
                                 np.abs(outputs64[key] - ref[key]), tol)
    name, _, part = row.stage[len(tag) + 1:].partition(" ")
    if name not in pairs32 or part not in ("scores", "labels+boxes"):
      return row
    ours32, theirs, size = pairs32[name]
    if part == "scores":
      errors = lambda ours: np.abs(np.asarray(ours["scores"], np.float64) - theirs["scores"])
      tol = TOL_DET_SCORES
    else:
      errors = lambda ours: (lambda e: e[~np.isnan(e)])(
          detection_box_errors(ours, theirs, TOL_DET_SCORES))
      tol = 5e-4 * max(size)
    return float64_arbitration(row, errors(ours32), errors(pairs64[name]), tol)

  return [arbitrate(row) for row in rows]


def msda_stages(d):
  """Deformable attention function and module against `ms_deform_attn.npz`."""
  shapes = tuple(tuple(int(v) for v in s) for s in d["spatial_shapes"])
  out = ms_deform_attn(jnp.asarray(d["value"]), shapes, jnp.asarray(d["sampling_locations"]),
                       jnp.asarray(d["attention_weights"]))
  results = [compare_close("msda/function", out, d["output"], atol=TOL_MODULE)]
  module = MultiScaleDeformableAttention(embed_dim=d["value"].shape[2] * d["value"].shape[3],
                                         num_heads=d["value"].shape[2], num_levels=len(shapes),
                                         num_points=d["sampling_locations"].shape[4])
  params = {"params": {n: {"kernel": jnp.asarray(d[f"module_{n}__weight"].T),
                           "bias": jnp.asarray(d[f"module_{n}__bias"])}
                       for n in ("sampling_offsets", "attention_weights", "value_proj",
                                 "output_proj")}}
  value = jnp.asarray(d["value"]).reshape(d["value"].shape[0], d["value"].shape[1], -1)
  for ref_name in ("ref2", "ref4"):
    out = module.apply(params, jnp.asarray(d["module_query"]), jnp.asarray(d["module_query_pos"]),
                       value, jnp.asarray(d[f"module_{ref_name}"]), shapes,
                       ~jnp.asarray(d["module_key_padding_mask"], bool))  # detrex: True = padded
    results.append(compare_close(f"msda/module_{ref_name}", out, d[f"module_out_{ref_name}"],
                                 atol=TOL_MODULE))
  return results


def eval_stages(reference, config, skipped=None, arbitrate=True):
  """Eval-forward stages of forward_eval.npz (indices forced). Decoder-output rows that miss
  their float32 tolerance get the float64 arbitration when `arbitrate` (decisions §8)."""
  ref = reference["forward_eval"]
  outputs, inter, images, pixel_valid, sizes, forced = _forced_forward(reference, config, ref,
                                                                       train=False)
  results = transformer_stages("eval", ref, outputs, inter, config.model.num_encoder_layers,
                               full=True, skipped=skipped)
  results += detection_stages("eval", ref, outputs, sizes, config.model.num_select)
  decoder_stages = {f"eval/{k}" for k, _ in DECODER_OUTPUTS}
  needs_f64 = [r for r in results if not r.passed and (
      r.stage in decoder_stages or r.stage.startswith(("eval/det_img", "eval/infer_img")))]
  if arbitrate and needs_f64 and config.model.dtype == "float32":
    outputs64, _ = float64_forward(reference, config, images, pixel_valid, forced)
    results = arbitrate_decoder_rows("eval", results, ref, outputs, outputs64, sizes,
                                     config.model.num_select)
  return results


def _forced_forward(reference, config, ref, train):
  """Our forward of the recorded eval or train batch, the record's indices forced:
  (outputs, intermediates, images, pixel_valid, sizes, forced)."""
  images, pixel_valid, sizes = make_batch(reference["inputs"], prefix="train_" if train else "")
  model, variables = build_model(config, reference["dir"], train=train)
  forced = forced_from(ref, config.model.num_encoder_layers)
  outputs, inter = run_forward(model, variables, images, pixel_valid, train, forced)
  return outputs, inter, images, pixel_valid, sizes, forced


def train_forward(reference, config):
  """Train-mode forward of the recorded train batch (padding masks on), indices forced:
  (outputs, intermediates)."""
  return _forced_forward(reference, config, reference["losses_train"], train=True)[:2]


def train_stages(reference, config, forward=None, skipped=None):
  outputs, inter = forward or train_forward(reference, config)
  ref = reference["losses_train"]
  results = transformer_stages("train", ref, outputs, inter, config.model.num_encoder_layers,
                               full=False, skipped=skipped)
  for l in range(config.model.num_levels):
    if f"padding_mask_lvl{l}" in ref:
      h, w = ref["spatial_shapes"][l]
      start = int(ref["spatial_shapes"][:l].prod(1).sum())
      ours = inter["token_valid"][:, start:start + h * w].reshape(-1, h, w)
      detrex_valid = ~np.asarray(ref[f"padding_mask_lvl{l}"], bool)  # detrex: True = padded
      results.append(compare_exact(f"train/padding_mask_lvl{l}", ours, detrex_valid))
  return results


def run_all(reference_dir, only: Optional[List[str]] = None, dtype: Optional[str] = None):
  """(results, skipped) of every stage that the directory's files allow. dtype: optional
  `config.model.dtype` override ("float64": run under `jax.enable_x64`, same tolerances)."""
  reference = load_reference(reference_dir)
  config = config_for_reference(reference["meta"])
  if dtype is not None:
    config.model.dtype = dtype
  results, skipped = [], []
  groups = [("msda", "ms_deform_attn", lambda: msda_stages(reference["ms_deform_attn"])),
            ("eval", "forward_eval", lambda: eval_stages(reference, config, skipped)),
            ("train", "losses_train", lambda: train_stages(reference, config, skipped=skipped)),
            ("criterion", "losses_train", lambda: criterion_only_stages(reference["dir"])),
            ("losses", "losses_train", lambda: train_loss_stages(reference, config)),
            ("grads", "grads_train", lambda: gradient_stages(reference, config, False)),
            ("dn", "dn_train", lambda: dn_stages(reference, config)),
            ("grads_dn", "grads_train_dn", lambda: gradient_stages(reference, config, True))]
  for name, file_key, fn in groups:
    if only and name not in only:
      continue
    if reference[file_key] is None or reference["inputs"] is None:
      skipped.append(f"{name} ({file_key}.npz absent)")
      continue
    try:
      results += fn()
    except MissingReferenceArray as e:
      skipped.append(f"{name} (array absent: {e.args[0]})")
  return results, skipped
