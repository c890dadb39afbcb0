"""Forward-pass parity stages: the eval and train forwards of a recorded set, the deformable
attention, and the post-processed detections (decisions §8).

A comparison whose arrays are absent from a (partial) directory is listed as skipped. Downstream
of every data-dependent top-k the reference indices are teacher-forced; the top-k's themselves are
compared tie-aware against our own (unforced) selection from our own keys. `run_all` runs every
stage group that a directory's files allow (these and those of `loss_stages.py`).
"""

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
  skipped (decisions §8: partial directories) instead of failing."""

  def __init__(self, tag, ref, skipped):
    self.tag, self.ref, self.skipped, self.rows = tag, ref, skipped, []

  def need(self, name, *keys):
    missing = [k for k in keys if k not in self.ref]
    if missing:
      self.skipped.append(f"{self.tag}/{name} (absent: {', '.join(missing)})")
    return not missing

  def add(self, row):
    self.rows.append(row)


# Decoder outputs (decisions §8, revised): the stages the float64 arbitration may pass.
DECODER_OUTPUTS = (("pred_logits", TOL_DEC_LOGITS), ("aux_pred_logits", TOL_DEC_LOGITS),
                   ("pred_boxes", TOL_DEC_BOXES), ("aux_pred_boxes", TOL_DEC_BOXES),
                   ("inter_references", TOL_DEC_BOXES))


def transformer_stages(tag, ref, outputs, inter, num_layers, full, skipped=None):
  """Stages shared by eval and train records. `full`: eval arrays (memory, backbone, ...).

  Every comparison runs only when its reference arrays are present; absent ones are appended to
  `skipped` (a list) by name.
  """
  st = _Stages(tag, ref, skipped if skipped is not None else [])
  add, need = st.add, st.need
  if need("spatial_shapes", "spatial_shapes"):
    shapes = np.asarray([f.shape[1:3] for f in inter["neck_features"]])
    add(compare_exact(f"{tag}/spatial_shapes", shapes, ref["spatial_shapes"]))
  for k in ("valid_token_nums", "focus_token_nums"):
    if need(k, k):
      add(compare_exact(f"{tag}/{k}", inter[k], ref[k]))
  if need("padding_mask_flat", "padding_mask_flat"):  # detrex's mask: True = padded
    add(compare_exact(f"{tag}/padding_mask_flat", inter["token_valid"],
                      ~np.asarray(ref["padding_mask_flat"], bool)))
  if need("valid_ratios", "valid_ratios"):
    add(compare_close(f"{tag}/valid_ratios", inter["valid_ratios"], ref["valid_ratios"],
                      atol=TOL_MODULE))
  if full and need("pos_embed_lvl0", "pos_embed_lvl0_img0_ch8"):
    ours = inter["pos_embed"][0][0].transpose(2, 0, 1)[::8]
    add(compare_close(f"{tag}/pos_embed_lvl0", ours, ref["pos_embed_lvl0_img0_ch8"],
                      atol=TOL_MODULE))
  if full:
    feats = inter["backbone_features"]
    stage_index = {"res3": 0, "res4": 1, "res5": 2, "p1": 0, "p2": 1, "p3": 2}
    for level, idx in stage_index.items():
      if f"backbone_{level}_shape" in ref:
        add(compare_exact(f"{tag}/backbone_{level}_shape", np.asarray(feats[idx].shape)[[0, 3, 1, 2]],
                          ref[f"backbone_{level}_shape"]))
      if f"backbone_{level}_img0_ch8" in ref:
        add(compare_close(f"{tag}/backbone_{level}", feats[idx][0].transpose(2, 0, 1)[::8],
                          ref[f"backbone_{level}_img0_ch8"], **TOL_BACKBONE))
      if f"backbone_{level}_chanmean" in ref:
        add(compare_close(f"{tag}/backbone_{level}_chanmean", feats[idx].mean(axis=(1, 2)),
                          ref[f"backbone_{level}_chanmean"], **TOL_BACKBONE))
    for l, feat in enumerate(inter["neck_features"]):
      if f"neck_lvl{l}_img0_ch2" in ref:
        add(compare_close(f"{tag}/neck_lvl{l}", feat[0].transpose(2, 0, 1)[::2],
                          ref[f"neck_lvl{l}_img0_ch2"], **TOL_BACKBONE))
      if f"neck_lvl{l}_chanmean" in ref:
        add(compare_close(f"{tag}/neck_lvl{l}_chanmean", feat.mean(axis=(1, 2)),
                          ref[f"neck_lvl{l}_chanmean"], **TOL_BACKBONE))
  shapes = [f.shape[1:3] for f in inter["neck_features"]]
  starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])])
  if need("fg_score", "fg_score"):
    add(compare_close(f"{tag}/fg_score", inter["fg_score"], ref["fg_score"], atol=TOL_FG))
  if need("fg_score_masked", "fg_score_masked"):
    add(compare_close(f"{tag}/fg_score_masked", inter["fg_score_masked"], ref["fg_score_masked"],
                      atol=TOL_FG))
  for l in range(len(shapes)):
    if f"fg_score_lvl{l}" in ref:
      add(compare_close(f"{tag}/fg_score_lvl{l}", inter["fg_score"][:, starts[l]:starts[l + 1]],
                        ref[f"fg_score_lvl{l}"], atol=TOL_FG))
  if need("fts_output_memory_rownorm", "fts_output_memory_rownorm"):
    add(compare_close(f"{tag}/fts_output_memory_rownorm", inter["fts_memory_rownorm"],
                      ref["fts_output_memory_rownorm"], rtol=1e-4))
  if need("enc_output_proposals_valid", "enc_output_proposals_valid"):
    add(compare_exact(f"{tag}/enc_output_proposals_valid", inter["proposals_valid"],
                      ref["enc_output_proposals_valid"]))
  for l in range(num_layers):
    enc = inter[f"encoder_layer{l}"]
    if need(f"fg_inds_layer{l}", f"fg_inds_layer{l}", "fg_score_masked"):
      k = ref[f"fg_inds_layer{l}"].shape[1]
      add(compare_topk(f"{tag}/fg_inds_layer{l}", _natural_topk(inter["fg_score_masked"], k),
                       ref[f"fg_inds_layer{l}"], ref["fg_score_masked"], TOL_FG))
    if need(f"oesm_score_tgt_max_layer{l}", f"oesm_score_tgt_max_layer{l}"):
      add(compare_close(f"{tag}/oesm_score_tgt_max_layer{l}", enc["score_max"],
                        ref[f"oesm_score_tgt_max_layer{l}"], atol=TOL_FG))
    if need(f"oesm_score_tgt_argmax_layer{l}", f"oesm_score_tgt_argmax_layer{l}"):
      add(compare_exact(f"{tag}/oesm_score_tgt_argmax_layer{l}", enc["score_argmax"],
                        ref[f"oesm_score_tgt_argmax_layer{l}"]))
    if need(f"oesm_mc_score_layer{l}", f"oesm_mc_score_layer{l}"):
      add(compare_close(f"{tag}/oesm_mc_score_layer{l}", enc["mc_score"],
                        ref[f"oesm_mc_score_layer{l}"], atol=TOL_MC))
    if f"oesm_sel_local_layer{l}" in ref:
      s = ref[f"oesm_sel_local_layer{l}"].shape[1]
      ours_sel = _natural_topk(enc["mc_score"], s)
      if f"oesm_mc_score_layer{l}" in ref:
        add(compare_topk(f"{tag}/oesm_sel_local_layer{l}", ours_sel,
                         ref[f"oesm_sel_local_layer{l}"], ref[f"oesm_mc_score_layer{l}"], TOL_MC))
      else:
        # The record keeps only the selected scores: ties judged on our keys, which the
        # oesm_sel_mc_score row checks against the reference's.
        res = compare_topk(f"{tag}/oesm_sel_local_layer{l}", ours_sel,
                           ref[f"oesm_sel_local_layer{l}"], enc["mc_score"], TOL_MC)
        res.detail += "; ties on our keys (reference keys absent)"
        add(res)
    else:
      need(f"oesm_sel_local_layer{l}", f"oesm_sel_local_layer{l}")
    if (need(f"oesm_sel_global_layer{l}", f"oesm_sel_global_layer{l}", f"fg_inds_layer{l}")
        and f"oesm_sel_local_layer{l}" in ref):
      ours_global = np.take_along_axis(ref[f"fg_inds_layer{l}"], enc["sel_local"], axis=1)
      add(compare_exact(f"{tag}/oesm_sel_global_layer{l} (forced)", ours_global,
                        ref[f"oesm_sel_global_layer{l}"]))
    if need(f"oesm_sel_mc_score_layer{l}", f"oesm_sel_mc_score_layer{l}"):
      add(compare_close(f"{tag}/oesm_sel_mc_score_layer{l}",
                        np.take_along_axis(enc["mc_score"], enc["sel_local"], axis=1),
                        ref[f"oesm_sel_mc_score_layer{l}"], atol=TOL_MC))
    if need(f"enc_layer{l}_out_rownorm", f"enc_layer{l}_out_rownorm"):
      add(compare_close(f"{tag}/enc_layer{l}_out_rownorm", enc["out_rownorm"],
                        ref[f"enc_layer{l}_out_rownorm"], rtol=1e-4))
  if need("memory", "memory"):
    add(compare_close(f"{tag}/memory", inter["memory"], ref["memory"], atol=TOL_MEMORY))
  if need("memory_rownorm", "memory_rownorm"):
    add(compare_close(f"{tag}/memory_rownorm", np.linalg.norm(inter["memory"], axis=-1),
                      ref["memory_rownorm"], rtol=1e-4))
  if need("enc_outputs_class_max_all", "enc_outputs_class_max_all"):
    add(compare_close(f"{tag}/enc_outputs_class_max_all", inter["enc_outputs_class_max_all"],
                      ref["enc_outputs_class_max_all"], atol=TOL_MEMORY))
  if need("enc_topk_proposals", "enc_topk_proposals", "enc_outputs_class_max_all"):
    k = ref["enc_topk_proposals"].shape[1]
    add(compare_topk(f"{tag}/enc_topk_proposals",
                     _natural_topk(inter["enc_outputs_class_max_all"], k),
                     ref["enc_topk_proposals"], ref["enc_outputs_class_max_all"], TOL_MEMORY))
  for key, tol in (("enc_pred_logits", TOL_MEMORY), ("enc_pred_boxes", TOL_MEMORY),
                   ("init_reference", TOL_MEMORY)) + DECODER_OUTPUTS:
    if need(key, key):
      add(compare_close(f"{tag}/{key}", outputs[key], ref[key], atol=tol))
  if need("dec_hidden_rownorm", "dec_hidden_rownorm"):
    # Fingerprint only; the decoder tolerance is on logits and boxes (reported, not gated).
    add(compare_close(f"{tag}/dec_hidden_rownorm", inter["dec_hidden_rownorm"],
                      ref["dec_hidden_rownorm"], atol=TOL_DEC_LOGITS))
  return st.rows


def _detection_pairs(ref, outputs, image_sizes, num_select):
  """(stage suffix, ours, reference, (h, w)) for the post-processed detections the record holds.

  infer_*: before detectron2's clipping; det_*: after (only the kept, non-empty boxes).
  """
  det = postprocess(jnp.asarray(outputs["pred_logits"]), jnp.asarray(outputs["pred_boxes"]),
                    jnp.asarray(image_sizes), num_select=num_select)
  det = jax.tree_util.tree_map(np.asarray, det)
  pairs = []
  for i, (h, w) in enumerate(image_sizes):
    if f"infer_scores_{i}" in ref:
      boxes = outputs["pred_boxes"][i][det["query"][i]]
      cx, cy, bw, bh = boxes.T
      unclipped = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                            (cy + bh / 2) * h], -1)
      pairs.append((f"infer_img{i}",
                    dict(scores=det["scores"][i], labels=det["labels"][i], boxes=unclipped),
                    dict(scores=ref[f"infer_scores_{i}"], labels=ref[f"infer_labels_{i}"],
                         boxes=ref[f"infer_boxes_xyxy_{i}"]), (h, w)))
    if f"det_scores_{i}" in ref:
      keep = det["valid"][i]
      pairs.append((f"det_img{i}",
                    dict(scores=det["scores"][i][keep], labels=det["labels"][i][keep],
                         boxes=det["boxes"][i][keep]),
                    dict(scores=ref[f"det_scores_{i}"], labels=ref[f"det_labels_{i}"],
                         boxes=ref[f"det_boxes_xyxy_{i}"]), (h, w)))
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
  """Apply the float64 arbitration (decisions §8, revised) to the failing decoder-output rows.

  outputs32/outputs64: our float32 / float64 outputs with every index forced. Rows of other
  stages, and passing rows, are returned unchanged.
  """
  by_stage = {f"{tag}/{key}": (key, tol) for key, tol in DECODER_OUTPUTS}
  pairs32 = {name: (o, t, size) for name, o, t, size in
             _detection_pairs(ref, outputs32, image_sizes, num_select)}
  pairs64 = {name: o for name, o, _, _ in
             _detection_pairs(ref, outputs64, image_sizes, num_select)}
  out = []
  for row in rows:
    if row.passed:
      out.append(row)
      continue
    if row.stage in by_stage:
      key, tol = by_stage[row.stage]
      out.append(float64_arbitration(row, np.abs(outputs32[key] - ref[key]),
                                     np.abs(outputs64[key] - ref[key]), tol))
      continue
    name, _, part = row.stage[len(tag) + 1:].partition(" ")
    if name in pairs32 and part in ("scores", "labels+boxes"):
      ours32, theirs, size = pairs32[name]
      ours64 = pairs64[name]
      if part == "scores":
        err32 = np.abs(np.asarray(ours32["scores"], np.float64) - theirs["scores"])
        err64 = np.abs(np.asarray(ours64["scores"], np.float64) - theirs["scores"])
        out.append(float64_arbitration(row, err32, err64, TOL_DET_SCORES))
      else:
        box_atol = 5e-4 * max(size)
        err32 = detection_box_errors(ours32, theirs, TOL_DET_SCORES)
        err64 = detection_box_errors(ours64, theirs, TOL_DET_SCORES)
        out.append(float64_arbitration(row, err32[~np.isnan(err32)], err64[~np.isnan(err64)],
                                       box_atol))
      continue
    out.append(row)
  return out


def msda_stages(ref):
  """Deformable attention function and module against `ms_deform_attn.npz`."""
  d = ref
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
  images, pixel_valid, sizes = make_batch(reference["inputs"])
  model, variables = build_model(config, reference["dir"], train=False)
  n = config.model.num_encoder_layers
  forced = forced_from(ref, n)
  outputs, inter = run_forward(model, variables, images, pixel_valid, False, forced)
  results = transformer_stages("eval", ref, outputs, inter, n, full=True, skipped=skipped)
  results += detection_stages("eval", ref, outputs, sizes, config.model.num_select)
  decoder_stages = {f"eval/{k}" for k, _ in DECODER_OUTPUTS}
  needs_f64 = [r for r in results if not r.passed and (
      r.stage in decoder_stages or r.stage.startswith(("eval/det_img", "eval/infer_img")))]
  if arbitrate and needs_f64 and config.model.dtype == "float32":
    outputs64, _ = float64_forward(reference, config, images, pixel_valid, forced)
    results = arbitrate_decoder_rows("eval", results, ref, outputs, outputs64, sizes,
                                     config.model.num_select)
  return results


def train_forward(reference, config):
  """Train-mode forward of the recorded train batch (padding masks on), indices forced."""
  ref = reference["losses_train"]
  images, pixel_valid, sizes = make_batch(reference["inputs"], prefix="train_")
  model, variables = build_model(config, reference["dir"], train=True)
  n = config.model.num_encoder_layers
  outputs, inter = run_forward(model, variables, images, pixel_valid, True, forced_from(ref, n))
  return dict(model=model, variables=variables, images=images, pixel_valid=pixel_valid,
              sizes=sizes, outputs=outputs, intermediates=inter)


def train_stages(reference, config, forward=None, skipped=None):
  forward = forward or train_forward(reference, config)
  ref = reference["losses_train"]
  results = transformer_stages("train", ref, forward["outputs"], forward["intermediates"],
                               config.model.num_encoder_layers, full=False, skipped=skipped)
  for l in range(config.model.num_levels):
    if f"padding_mask_lvl{l}" in ref:
      shapes = [tuple(int(v) for v in s) for s in ref["spatial_shapes"]]
      start = int(sum(h * w for h, w in shapes[:l]))
      h, w = shapes[l]
      ours = forward["intermediates"]["token_valid"][:, start:start + h * w].reshape(-1, h, w)
      detrex_valid = ~np.asarray(ref[f"padding_mask_lvl{l}"], bool)  # detrex: True = padded
      results.append(compare_exact(f"train/padding_mask_lvl{l}", ours, detrex_valid))
  return results


def run_all(reference_dir, only: Optional[List[str]] = None, dtype: Optional[str] = None):
  """Every stage that the directory's files allow. Returns (results, skipped).

  dtype: optional `config.model.dtype` override ("float64": our model computed in float64, under
  `jax.enable_x64`, against the float32 reference; the tolerances stay the same).
  """
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
