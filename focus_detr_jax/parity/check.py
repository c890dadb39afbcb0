"""Parity stages against data recorded from the official detrex implementation.

Works on any directory laid out like `shared/parity/public` (decisions §8): the detrex config
name comes from `meta.json`, the weights are rebuilt from `state_dict_manifest.json` and the seed,
the inputs from `inputs.npz`. A stage whose arrays are absent is skipped. Downstream of every
data-dependent top-k the reference indices are teacher-forced; the top-k's themselves are
compared tie-aware against our own (unforced) selection from our own keys.
"""

import importlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.convert import detrex as detrex_convert
from focus_detr_jax.models.deformable_attention import MultiScaleDeformableAttention, ms_deform_attn
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.models.postprocess import postprocess
from focus_detr_jax.parity.compare import (StageResult, compare_close, compare_detections,
                                           compare_exact, compare_topk, detection_box_errors,
                                           float64_arbitration)
from focus_detr_jax.parity.weights import build_state_dict

# Tolerances of decisions.md §8 (never loosen).
TOL_MODULE = 1e-5
TOL_BACKBONE = dict(atol=1e-4, rtol=1e-4)
TOL_FG = 1e-5
TOL_MC = 1e-4
TOL_MEMORY = 1e-4
TOL_DEC_LOGITS = 5e-3
TOL_DEC_BOXES = 5e-4
TOL_DET_SCORES = 2e-3

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_parity_root():
  return Path(os.environ.get("FOCUS_DETR_PARITY_ROOT", REPO_ROOT.parent / "shared" / "parity"))


def config_for_reference(meta):
  """Our config module for the detrex config named in meta.json."""
  name = Path(meta["config"]).stem
  module = importlib.import_module(f"configs.{name}")
  return module.get_config()


class MissingReferenceArray(KeyError):
  """A stage needs an array that this (partial) reference directory does not hold."""


class ReferenceArrays(dict):
  """The arrays of one reference .npz; a missing key raises MissingReferenceArray, which
  run_all turns into a skipped stage group (decisions §8: partial directories)."""

  def __init__(self, path):
    with np.load(path) as z:
      super().__init__({k: z[k] for k in z.files})
    self.file = Path(path).name

  def __missing__(self, key):
    raise MissingReferenceArray(f"{self.file}:{key}")


def _npz(path):
  return ReferenceArrays(path) if path.exists() else None


def load_reference(reference_dir):
  d = Path(reference_dir)
  meta = json.loads((d / "meta.json").read_text())
  return dict(dir=d, meta=meta, inputs=_npz(d / "inputs.npz"),
              forward_eval=_npz(d / "forward_eval.npz"),
              losses_train=_npz(d / "losses_train.npz"),
              foreground_labels=_npz(d / "foreground_labels.npz"),
              ms_deform_attn=_npz(d / "ms_deform_attn.npz"),
              dn_train=_npz(d / "dn_train.npz"),
              grads_train=_npz(d / "grads_train.npz"),
              grads_train_dn=_npz(d / "grads_train_dn.npz"))


def make_batch(inputs, prefix=""):
  """detrex ImageList: normalise, zero-pad bottom/right to the batch max; mask True = padded."""
  images = [inputs[k] for k in sorted(k for k in inputs if k.startswith(prefix + "image_")
                                      and k[len(prefix + "image_"):].isdigit())]
  mean, std = inputs["pixel_mean"], inputs["pixel_std"]
  h = max(im.shape[1] for im in images)
  w = max(im.shape[2] for im in images)
  batch = np.zeros((len(images), h, w, 3), np.float32)
  mask = np.ones((len(images), h, w), bool)
  sizes = []
  for i, im in enumerate(images):
    x = im.astype(np.float32).transpose(1, 2, 0)
    batch[i, :x.shape[0], :x.shape[1]] = (x - mean) / std
    mask[i, :x.shape[0], :x.shape[1]] = False
    sizes.append(x.shape[:2])
  return batch, mask, np.asarray(sizes, np.int32)


def build_model(config, reference_dir, image_shape, train):
  """Model + variables from the manifest weights; eval reproduces detrex (no mask)."""
  model_config = config.model
  if not train:
    model_config = model_config.copy_and_resolve_references()
    model_config.eval_padding_mask = False
  model = FocusDETR.from_config(model_config)
  d = Path(reference_dir)
  seed = int(json.loads((d / "meta.json").read_text())["seed"])
  state_dict = build_state_dict(d / "state_dict_manifest.json", seed)
  dummy = jnp.zeros(image_shape, jnp.float32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy,
                                             jnp.zeros(image_shape[:3], bool)))
  shapes = {k: v for k, v in shapes.items() if k in ("params", "frozen")}
  backbone_mapper = None
  if config.model.backbone.name == "swin":
    from focus_detr_jax.convert import swin as swin_convert
    backbone_mapper = swin_convert.swin_key_to_path
  variables, _ = detrex_convert.state_dict_to_variables(
      state_dict, shapes, config.model.num_decoder_layers, config.model.num_encoder_layers,
      backbone_mapper=backbone_mapper)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)


def forced_from(ref, num_layers):
  """Teacher-forced indices: whichever of the cascade, OESM and top-Q the record holds."""
  forced = {}
  if all(f"fg_inds_layer{l}" in ref for l in range(num_layers)):
    forced["fg_inds"] = tuple(ref[f"fg_inds_layer{l}"] for l in range(num_layers))
    if all(f"oesm_sel_local_layer{l}" in ref for l in range(num_layers)):
      forced["oesm_sel_local"] = tuple(ref[f"oesm_sel_local_layer{l}"] for l in range(num_layers))
  if "enc_topk_proposals" in ref:
    forced["enc_topk_proposals"] = ref["enc_topk_proposals"]
  return forced


def run_forward(model, variables, images, padding_mask, train, forced):
  fn = jax.jit(lambda v, x, m, f: model.apply(v, x, m, train=train, forced=f,
                                              mutable=["intermediates"]))
  outputs, state = fn(variables, jnp.asarray(images), jnp.asarray(padding_mask), forced)
  inter = jax.tree_util.tree_map(lambda x: np.asarray(x), state["intermediates"])
  inter = {k: (v[0] if isinstance(v, tuple) else v) for k, v in inter.items()}
  return jax.tree_util.tree_map(np.asarray, outputs), inter


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
  for k in ("valid_token_nums", "focus_token_nums", "padding_mask_flat"):
    if need(k, k):
      add(compare_exact(f"{tag}/{k}", inter[k], ref[k]))
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


def float64_outputs(reference, config, images, mask, forced, train=False):
  """Our model in float64 (under jax.enable_x64) on the same inputs, the given indices forced."""
  config64 = config.copy_and_resolve_references()
  config64.model.dtype = "float64"
  with jax.enable_x64(True):
    model64, variables64 = build_model(config64, reference["dir"], images.shape, train=train)
    outputs64, _ = run_forward(model64, variables64, images.astype(np.float64), mask, train,
                               forced)
  return outputs64


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
                       jnp.asarray(d["module_key_padding_mask"]))
    results.append(compare_close(f"msda/module_{ref_name}", out, d[f"module_out_{ref_name}"],
                                 atol=TOL_MODULE))
  return results


def eval_stages(reference, config, skipped=None, arbitrate=True):
  """Eval-forward stages of forward_eval.npz (indices forced). Decoder-output rows that miss
  their float32 tolerance get the float64 arbitration when `arbitrate` (decisions §8)."""
  ref = reference["forward_eval"]
  images, mask, sizes = make_batch(reference["inputs"])
  model, variables = build_model(config, reference["dir"], images.shape, train=False)
  n = config.model.num_encoder_layers
  forced = forced_from(ref, n)
  outputs, inter = run_forward(model, variables, images, mask, False, forced)
  results = transformer_stages("eval", ref, outputs, inter, n, full=True, skipped=skipped)
  results += detection_stages("eval", ref, outputs, sizes, config.model.num_select)
  decoder_stages = {f"eval/{k}" for k, _ in DECODER_OUTPUTS}
  needs_f64 = [r for r in results if not r.passed and (
      r.stage in decoder_stages or r.stage.startswith(("eval/det_img", "eval/infer_img")))]
  if arbitrate and needs_f64 and config.model.dtype == "float32":
    outputs64 = float64_outputs(reference, config, images, mask, forced)
    results = arbitrate_decoder_rows("eval", results, ref, outputs, outputs64, sizes,
                                     config.model.num_select)
  return results


def train_forward(reference, config):
  """Train-mode forward of the recorded train batch (padding masks on), indices forced."""
  ref = reference["losses_train"]
  images, mask, sizes = make_batch(reference["inputs"], prefix="train_")
  model, variables = build_model(config, reference["dir"], images.shape, train=True)
  n = config.model.num_encoder_layers
  outputs, inter = run_forward(model, variables, images, mask, True, forced_from(ref, n))
  return dict(model=model, variables=variables, images=images, padding_mask=mask, sizes=sizes,
              outputs=outputs, intermediates=inter)


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
      ours = forward["intermediates"]["padding_mask_flat"][:, start:start + h * w].reshape(-1, h, w)
      results.append(compare_exact(f"train/padding_mask_lvl{l}", ours, ref[f"padding_mask_lvl{l}"]))
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


# ----------------------------------------------------------------------------------------------
# Training objective: model forward (teacher-forced) + criterion, with DN off and on, and the
# gradients of the total loss.

TOL_LOSS = 1e-4
TOL_GRAD_NORM = 1e-2
TOL_GRAD_NORM_ATOL = 1e-8          # where the reference norm is below 1e-6
TOL_GRAD_REL_L2 = 2e-2
TOL_GRAD_MAX = 3e-2
MATCH_NAMES = ("final", "aux0", "aux1", "aux2", "aux3", "aux4", "enc")


def _train_batch(reference, max_boxes):
  from focus_detr_jax.parity.loss_stages import load_targets
  images, mask, _ = make_batch(reference["inputs"], prefix="train_")
  targets = load_targets(reference["dir"], max_boxes)
  return dict(image=jnp.asarray(images), padding_mask=jnp.asarray(mask),
              **{k: jnp.asarray(v) for k, v in targets.items()})


def _objective(reference, config, ref, with_dn):
  """(model, variables, batch, loss_fn(params) -> (total, aux)) for one recorded train run."""
  from focus_detr_jax.train import denoising as denoising_lib
  from focus_detr_jax.train.objective import model_loss
  config = config.copy_and_resolve_references()
  if not with_dn:
    config.model.dn_number = 0
  batch = _train_batch(reference, config.data.max_boxes)
  model, variables = build_model(config, reference["dir"], batch["image"].shape, train=True)
  forced = forced_from(ref, config.model.num_encoder_layers)
  draws = None
  if with_dn:
    draws = denoising_lib.cdn_draws_from_detrex_rows(ref, batch["image"].shape[0],
                                                     2 * config.model.dn_number)
  extra = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(params):
    return model_loss(model, params, extra, batch, config, dn_draws=draws, forced=forced)

  return model, variables, batch, loss_fn


def _loss_rows(tag, ref, aux):
  rows = []
  names = [str(n) for n in ref["loss_names"]]
  ours = np.asarray([float(aux["losses"][n]) for n in names])
  rows.append(compare_close(f"{tag}/loss_terms ({len(names)})", ours, ref["loss_raw"],
                            rtol=TOL_LOSS, detail="worst: " + names[int(np.argmax(
                                np.abs(ours - ref["loss_raw"]) / np.maximum(
                                    np.abs(ref["loss_raw"]), 1e-30)))]))
  total = sum(float(aux["weighted"][n]) for n in names)
  rows.append(compare_close(f"{tag}/loss_total", total, ref["loss_total"], rtol=TOL_LOSS))
  matching = aux["matching"]
  bad = 0
  for k, name in enumerate(MATCH_NAMES):
    for b in range(matching.query_index.shape[1]):
      if f"match_{name}_src_{b}" not in ref:
        continue
      src, tgt = ref[f"match_{name}_src_{b}"], ref[f"match_{name}_tgt_{b}"]
      ours = {int(t): int(q) for t, q in enumerate(np.asarray(matching.query_index[k, b]))
              if bool(matching.matched[k, b, t])}
      bad += int(ours != {int(t): int(s) for s, t in zip(src, tgt)})
  rows.append(StageResult(f"{tag}/hungarian_matchings (7 calls x images)", float(bad),
                          "exact", bad == 0))
  return rows


_OBJECTIVE_CACHE = {}


def run_objective(reference, config, with_dn):
  """Loss parts and gradients of one recorded train run, one compiled program (cached)."""
  key = (str(reference["dir"]), with_dn)
  if key not in _OBJECTIVE_CACHE:
    ref = reference["dn_train"] if with_dn else reference["losses_train"]
    _, variables, _, loss_fn = _objective(reference, config, ref, with_dn=with_dn)
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
  rows.append(compare_close("train_dn_on/dn_pred_logits_all_layers",
                            out["dn_pred_logits"][:, :, :s], ref["dn_pred_logits_all_layers"],
                            atol=TOL_DEC_LOGITS))
  rows.append(compare_close("train_dn_on/dn_pred_boxes_all_layers",
                            out["dn_pred_boxes"][:, :, :s], ref["dn_pred_boxes_all_layers"],
                            atol=TOL_DEC_BOXES))
  for key, tol in (("pred_logits", TOL_DEC_LOGITS), ("pred_boxes", TOL_DEC_BOXES),
                   ("aux_pred_logits", TOL_DEC_LOGITS), ("aux_pred_boxes", TOL_DEC_BOXES)):
    rows.append(compare_close(f"train_dn_on/{key}", out[key], ref[key], atol=tol))
  rows += _loss_rows("train_dn_on", ref, aux)
  return rows


def gradient_stages(reference, config, with_dn):
  """Gradients of the total loss vs grads_train(_dn).npz: norms per parameter, full arrays."""
  tag = "grads_dn_on" if with_dn else "grads_dn_off"
  grads_ref = reference["grads_train_dn" if with_dn else "grads_train"]
  _, _, grads = run_objective(reference, config, with_dn)
  names = [str(n) for n in grads_ref["param_names"]]
  backbone_mapper = None
  if config.model.backbone.name == "swin":
    from focus_detr_jax.convert import swin as swin_convert
    backbone_mapper = swin_convert.swin_key_to_path
  ours = detrex_convert.variables_to_state_dict(
      {"params": grads}, names, config.model.num_decoder_layers, config.model.num_encoder_layers,
      backbone_mapper=backbone_mapper)
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
    node = grads
    for p in tuple(rule[1]) + (rule[3],):
      node = node[p]
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


def criterion_only_stages(reference_dir):
  """Criterion on the stored outputs (helper rows of parity/loss_stages.py)."""
  from focus_detr_jax.parity import loss_stages
  rows = []
  for r in loss_stages.loss_stage_rows(reference_dir):
    if r.passed is None:
      continue
    rows.append(StageResult(f"criterion/{r.stage}", float(r.max_error), f"{r.tolerance:g}",
                            bool(r.passed)))
  return rows


def decoder_sensitivity(reference_dir, sigma: float = 1e-6, trials: int = 3, seed: int = 0):
  """Diagnostic (not a pass/fail stage): how much the decoder amplifies tiny memory changes.

  Runs the eval forward with every index and the encoder `memory` forced to the reference's,
  then again with N(0, sigma^2) noise added to that memory. Returns rows (name, max abs error):
  the decoder outputs against the reference with the reference's own memory, and the change of
  our own outputs caused by the noise. When a noise far below the reference's own thread-to-thread
  variation of `memory` (parity READMEs) moves the outputs by more than the decoder tolerance,
  that tolerance cannot be met reliably on that input (decisions §8: such stages keep failing and
  the evidence goes to the notes).
  """
  reference = load_reference(reference_dir)
  config = config_for_reference(reference["meta"])
  ref = reference["forward_eval"]
  images, mask, _ = make_batch(reference["inputs"])
  model, variables = build_model(config, reference["dir"], images.shape, train=False)
  forced = forced_from(ref, config.model.num_encoder_layers)
  memory = np.asarray(ref["memory"], np.float32)
  keys = ("pred_logits", "pred_boxes")
  outputs, _ = run_forward(model, variables, images, mask, False, dict(forced, memory=memory))
  rows = [(f"memory forced to reference: {k} vs reference",
           float(np.abs(outputs[k] - ref[k]).max())) for k in keys]
  rng = np.random.default_rng(seed)
  for t in range(trials):
    noisy = memory + rng.normal(scale=sigma, size=memory.shape).astype(np.float32)
    perturbed, _ = run_forward(model, variables, images, mask, False, dict(forced, memory=noisy))
    rows += [(f"memory + N(0, {sigma:g}) noise, trial {t}: change of our {k}",
              float(np.abs(perturbed[k] - outputs[k]).max())) for k in keys]
  rows += float64_rounding_rows(reference, config, outputs)
  return rows


def float64_rounding_rows(reference, config, outputs32=None):
  """Diagnostic: the float32 rounding error of each side, measured against float64.

  Runs our model with `model.dtype = "float64"` (under `jax.enable_x64`) on the reference's
  inputs, every index forced, twice: with the reference's own `memory` forced (the decoder alone)
  and end to end. With our float64 result as the exact value of the computation, the rows give
  |reference float32 - float64| (the reference's rounding error) next to
  |ours float32 - float64| (ours), per decoder output. Returns rows (name, max abs difference).
  """
  ref = reference["forward_eval"]
  images, mask, _ = make_batch(reference["inputs"])
  forced = forced_from(ref, config.model.num_encoder_layers)
  memory = np.asarray(ref["memory"], np.float32)
  if outputs32 is None:
    model, variables = build_model(config, reference["dir"], images.shape, train=False)
    outputs32, _ = run_forward(model, variables, images, mask, False, dict(forced, memory=memory))
  config64 = config.copy_and_resolve_references()
  config64.model.dtype = "float64"
  with jax.enable_x64(True):
    model64, variables64 = build_model(config64, reference["dir"], images.shape, train=False)
    images64 = images.astype(np.float64)
    decoder64, _ = run_forward(model64, variables64, images64, mask, False,
                               dict(forced, memory=memory.astype(np.float64)))
    full64, inter64 = run_forward(model64, variables64, images64, mask, False, forced)
  full64 = dict(full64, memory=inter64["memory"])
  rows = []
  for k in ("pred_logits", "pred_boxes", "inter_references"):
    rows += [(f"memory forced: |reference f32 - ours f64| {k}",
              float(np.abs(ref[k] - decoder64[k]).max())),
             (f"memory forced: |ours f32 - ours f64| {k}",
              float(np.abs(outputs32[k] - decoder64[k]).max()))]
  rows += [(f"end to end: |reference f32 - ours f64| {k}", float(np.abs(ref[k] - full64[k]).max()))
           for k in ("memory", "pred_logits", "pred_boxes", "inter_references")]
  return rows
