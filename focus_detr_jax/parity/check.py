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
                                           compare_exact, compare_topk)
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


def _npz(path):
  return dict(np.load(path)) if path.exists() else None


def load_reference(reference_dir):
  d = Path(reference_dir)
  meta = json.loads((d / "meta.json").read_text())
  return dict(dir=d, meta=meta, inputs=_npz(d / "inputs.npz"),
              forward_eval=_npz(d / "forward_eval.npz"),
              losses_train=_npz(d / "losses_train.npz"),
              foreground_labels=_npz(d / "foreground_labels.npz"),
              ms_deform_attn=_npz(d / "ms_deform_attn.npz"))


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
  return dict(fg_inds=tuple(ref[f"fg_inds_layer{l}"] for l in range(num_layers)),
              oesm_sel_local=tuple(ref[f"oesm_sel_local_layer{l}"] for l in range(num_layers)),
              enc_topk_proposals=ref["enc_topk_proposals"])


def run_forward(model, variables, images, padding_mask, train, forced):
  fn = jax.jit(lambda v, x, m, f: model.apply(v, x, m, train=train, forced=f,
                                              mutable=["intermediates"]))
  outputs, state = fn(variables, jnp.asarray(images), jnp.asarray(padding_mask), forced)
  inter = jax.tree_util.tree_map(lambda x: np.asarray(x), state["intermediates"])
  inter = {k: (v[0] if isinstance(v, tuple) else v) for k, v in inter.items()}
  return jax.tree_util.tree_map(np.asarray, outputs), inter


def _natural_topk(key, k):
  return np.argsort(-np.asarray(key, np.float64), axis=-1, kind="stable")[..., :k]


def transformer_stages(tag, ref, outputs, inter, num_layers, full):
  """Stages shared by eval and train records. `full`: eval arrays (memory, backbone, ...)."""
  r: List[StageResult] = []
  add = r.append
  has = lambda k: k in ref
  if has("spatial_shapes"):
    shapes = np.asarray([f.shape[1:3] for f in inter["neck_features"]])
    add(compare_exact(f"{tag}/spatial_shapes", shapes, ref["spatial_shapes"]))
  for k in ("valid_token_nums", "focus_token_nums"):
    if has(k):
      add(compare_exact(f"{tag}/{k}", inter[k], ref[k]))
  if has("padding_mask_flat"):
    add(compare_exact(f"{tag}/padding_mask_flat", inter["padding_mask_flat"],
                      ref["padding_mask_flat"]))
  if has("valid_ratios"):
    add(compare_close(f"{tag}/valid_ratios", inter["valid_ratios"], ref["valid_ratios"],
                      atol=TOL_MODULE))
  if full and has("pos_embed_lvl0_img0_ch8"):
    ours = inter["pos_embed"][0][0].transpose(2, 0, 1)[::8]
    add(compare_close(f"{tag}/pos_embed_lvl0", ours, ref["pos_embed_lvl0_img0_ch8"],
                      atol=TOL_MODULE))
  if full:
    feats = inter["backbone_features"]
    for key in sorted(k for k in ref if k.startswith("backbone_") and k.endswith("_img0_ch8")):
      level = key[len("backbone_"):-len("_img0_ch8")]
      idx = {"res3": 0, "res4": 1, "res5": 2, "p1": 0, "p2": 1, "p3": 2}.get(level)
      if idx is None:
        continue
      add(compare_close(f"{tag}/backbone_{level}", feats[idx][0].transpose(2, 0, 1)[::8],
                        ref[key], **TOL_BACKBONE))
      add(compare_close(f"{tag}/backbone_{level}_chanmean", feats[idx].mean(axis=(1, 2)),
                        ref[f"backbone_{level}_chanmean"], **TOL_BACKBONE))
    for l, feat in enumerate(inter["neck_features"]):
      if has(f"neck_lvl{l}_img0_ch2"):
        add(compare_close(f"{tag}/neck_lvl{l}", feat[0].transpose(2, 0, 1)[::2],
                          ref[f"neck_lvl{l}_img0_ch2"], **TOL_BACKBONE))
        add(compare_close(f"{tag}/neck_lvl{l}_chanmean", feat.mean(axis=(1, 2)),
                          ref[f"neck_lvl{l}_chanmean"], **TOL_BACKBONE))
  sizes = np.asarray([h * w for h, w in ref["spatial_shapes"]]) if has("spatial_shapes") else None
  if has("fg_score"):
    add(compare_close(f"{tag}/fg_score", inter["fg_score"], ref["fg_score"], atol=TOL_FG))
    add(compare_close(f"{tag}/fg_score_masked", inter["fg_score_masked"], ref["fg_score_masked"],
                      atol=TOL_FG))
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for l in range(len(sizes)):
      if has(f"fg_score_lvl{l}"):
        add(compare_close(f"{tag}/fg_score_lvl{l}", inter["fg_score"][:, starts[l]:starts[l + 1]],
                          ref[f"fg_score_lvl{l}"], atol=TOL_FG))
  if has("fts_output_memory_rownorm"):
    add(compare_close(f"{tag}/fts_output_memory_rownorm", inter["fts_memory_rownorm"],
                      ref["fts_output_memory_rownorm"], rtol=1e-4))
  if has("enc_output_proposals_valid"):
    add(compare_exact(f"{tag}/enc_output_proposals_valid", inter["proposals_valid"],
                      ref["enc_output_proposals_valid"]))
  for l in range(num_layers):
    if not has(f"fg_inds_layer{l}"):
      continue
    k = ref[f"fg_inds_layer{l}"].shape[1]
    add(compare_topk(f"{tag}/fg_inds_layer{l}", _natural_topk(inter["fg_score_masked"], k),
                     ref[f"fg_inds_layer{l}"], ref["fg_score_masked"], TOL_FG))
    enc = inter[f"encoder_layer{l}"]
    add(compare_close(f"{tag}/oesm_score_tgt_max_layer{l}", enc["score_max"],
                      ref[f"oesm_score_tgt_max_layer{l}"], atol=TOL_FG))
    add(compare_exact(f"{tag}/oesm_score_tgt_argmax_layer{l}", enc["score_argmax"],
                      ref[f"oesm_score_tgt_argmax_layer{l}"]))
    add(compare_close(f"{tag}/oesm_mc_score_layer{l}", enc["mc_score"],
                      ref[f"oesm_mc_score_layer{l}"], atol=TOL_MC))
    s = ref[f"oesm_sel_local_layer{l}"].shape[1]
    ours_sel = _natural_topk(enc["mc_score"], s)
    add(compare_topk(f"{tag}/oesm_sel_local_layer{l}", ours_sel, ref[f"oesm_sel_local_layer{l}"],
                     ref[f"oesm_mc_score_layer{l}"], TOL_MC))
    ours_global = np.take_along_axis(ref[f"fg_inds_layer{l}"], enc["sel_local"], axis=1)
    add(compare_exact(f"{tag}/oesm_sel_global_layer{l} (forced)", ours_global,
                      ref[f"oesm_sel_global_layer{l}"]))
    add(compare_close(f"{tag}/oesm_sel_mc_score_layer{l}",
                      np.take_along_axis(enc["mc_score"], enc["sel_local"], axis=1),
                      ref[f"oesm_sel_mc_score_layer{l}"], atol=TOL_MC))
    add(compare_close(f"{tag}/enc_layer{l}_out_rownorm", enc["out_rownorm"],
                      ref[f"enc_layer{l}_out_rownorm"], rtol=1e-4))
  if has("memory"):
    add(compare_close(f"{tag}/memory", inter["memory"], ref["memory"], atol=TOL_MEMORY))
  if has("memory_rownorm"):
    add(compare_close(f"{tag}/memory_rownorm", np.linalg.norm(inter["memory"], axis=-1),
                      ref["memory_rownorm"], rtol=1e-4))
  if has("enc_outputs_class_max_all"):
    add(compare_close(f"{tag}/enc_outputs_class_max_all", inter["enc_outputs_class_max_all"],
                      ref["enc_outputs_class_max_all"], atol=TOL_MEMORY))
    k = ref["enc_topk_proposals"].shape[1]
    add(compare_topk(f"{tag}/enc_topk_proposals", _natural_topk(inter["enc_outputs_class_max_all"],
                                                                k),
                     ref["enc_topk_proposals"], ref["enc_outputs_class_max_all"], TOL_MEMORY))
  for key, ours, tol in (("enc_pred_logits", outputs["enc_pred_logits"], TOL_MEMORY),
                         ("enc_pred_boxes", outputs["enc_pred_boxes"], TOL_MEMORY),
                         ("init_reference", outputs["init_reference"], TOL_MEMORY),
                         ("pred_logits", outputs["pred_logits"], TOL_DEC_LOGITS),
                         ("aux_pred_logits", outputs["aux_pred_logits"], TOL_DEC_LOGITS),
                         ("pred_boxes", outputs["pred_boxes"], TOL_DEC_BOXES),
                         ("aux_pred_boxes", outputs["aux_pred_boxes"], TOL_DEC_BOXES),
                         ("inter_references", outputs["inter_references"], TOL_DEC_BOXES)):
    if has(key):
      add(compare_close(f"{tag}/{key}", ours, ref[key], atol=tol))
  if has("dec_hidden_rownorm"):
    # Fingerprint only; the decoder tolerance is on logits and boxes (reported, not gated).
    res = compare_close(f"{tag}/dec_hidden_rownorm", inter["dec_hidden_rownorm"],
                        ref["dec_hidden_rownorm"], atol=TOL_DEC_LOGITS)
    add(res)
  return r


def detection_stages(tag, ref, outputs, image_sizes, num_select):
  r = []
  if "infer_scores_0" not in ref:
    return r
  det = postprocess(jnp.asarray(outputs["pred_logits"]), jnp.asarray(outputs["pred_boxes"]),
                    jnp.asarray(image_sizes), num_select=num_select)
  det = jax.tree_util.tree_map(np.asarray, det)
  for i, (h, w) in enumerate(image_sizes):
    # infer_*: before detectron2's clipping; det_*: after.
    boxes = outputs["pred_boxes"][i][det["query"][i]]
    cx, cy, bw, bh = boxes.T
    unclipped = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                          (cy + bh / 2) * h], -1)
    ours_infer = dict(scores=det["scores"][i], labels=det["labels"][i], boxes=unclipped)
    ref_infer = dict(scores=ref[f"infer_scores_{i}"], labels=ref[f"infer_labels_{i}"],
                     boxes=ref[f"infer_boxes_xyxy_{i}"])
    r += compare_detections(f"{tag}/infer_img{i}", ours_infer, ref_infer, (h, w))
    keep = det["valid"][i]
    ours_det = dict(scores=det["scores"][i][keep], labels=det["labels"][i][keep],
                    boxes=det["boxes"][i][keep])
    ref_det = dict(scores=ref[f"det_scores_{i}"], labels=ref[f"det_labels_{i}"],
                   boxes=ref[f"det_boxes_xyxy_{i}"])
    if len(ours_det["scores"]) != len(ref_det["scores"]):
      r.append(StageResult(f"{tag}/det_img{i} count", abs(len(ours_det["scores"]) -
                                                         len(ref_det["scores"])), "exact", False))
    else:
      r += compare_detections(f"{tag}/det_img{i}", ours_det, ref_det, (h, w))
  return r


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


def eval_stages(reference, config):
  ref = reference["forward_eval"]
  images, mask, sizes = make_batch(reference["inputs"])
  model, variables = build_model(config, reference["dir"], images.shape, train=False)
  n = config.model.num_encoder_layers
  outputs, inter = run_forward(model, variables, images, mask, False, forced_from(ref, n))
  results = transformer_stages("eval", ref, outputs, inter, n, full=True)
  results += detection_stages("eval", ref, outputs, sizes, config.model.num_select)
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


def train_stages(reference, config, forward=None):
  forward = forward or train_forward(reference, config)
  ref = reference["losses_train"]
  results = transformer_stages("train", ref, forward["outputs"], forward["intermediates"],
                               config.model.num_encoder_layers, full=False)
  for l in range(config.model.num_levels):
    if f"padding_mask_lvl{l}" in ref:
      shapes = [tuple(int(v) for v in s) for s in ref["spatial_shapes"]]
      start = int(sum(h * w for h, w in shapes[:l]))
      h, w = shapes[l]
      ours = forward["intermediates"]["padding_mask_flat"][:, start:start + h * w].reshape(-1, h, w)
      results.append(compare_exact(f"train/padding_mask_lvl{l}", ours, ref[f"padding_mask_lvl{l}"]))
  return results


def run_all(reference_dir, only: Optional[List[str]] = None):
  """Every stage that the directory's files allow. Returns (results, skipped)."""
  reference = load_reference(reference_dir)
  config = config_for_reference(reference["meta"])
  results, skipped = [], []
  groups = [("msda", "ms_deform_attn", lambda: msda_stages(reference["ms_deform_attn"])),
            ("eval", "forward_eval", lambda: eval_stages(reference, config)),
            ("train", "losses_train", lambda: train_stages(reference, config))]
  for name, file_key, fn in groups:
    if only and name not in only:
      continue
    if reference[file_key] is None or reference["inputs"] is None:
      skipped.append(f"{name} ({file_key}.npz absent)")
      continue
    results += fn()
  return results, skipped
