"""Record a parity reference set from the official detrex Focus-DETR on the CPU.

Needs torch, detectron2 and detrex (with its `projects/` folder) importable; see
docs/reproducibility.md, which lists the files each part writes. Import torch only after
`configure_cpu` (the CPU-kernel choice is read from the environment when torch loads).
"""

import collections
import contextlib
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from focus_detr_jax.parity.weights import rule_value, sha256

PINNED_COMMITS = {"detrex": "e244e6c3da3e84566728c52c21fb061d23ce0e2f",
                  "detectron2": "02b5c4e295e990042a714712c21dc79b731e8833"}
MATCH_NAMES = ("final", "aux0", "aux1", "aux2", "aux3", "aux4", "enc")
PARTS = ("eval", "train", "grads", "dn", "msda")
# Arrays --compact leaves out: the largest eval ones (their stages run on the full sets), and DN
# ones that check_parity does not read.
_COMPACT_DROP = {"eval": ("memory", "aux_pred_logits", "neck_lvl0_img0_ch2", "neck_lvl0_chanmean"),
                 "dn": ("dn_input_label_embed", "inter_references", "dec_hidden_rownorm")}
# Full gradient arrays stored by the public set (training_extras.md §6); absent names are skipped.
GRAD_FULL = (
    "transformer.alpha", "transformer.enc_mask_predictor.layer1.0.weight",
    "transformer.enc_mask_predictor.layer1.1.weight",
    "transformer.enc_mask_predictor.layer2.0.weight",
    "transformer.enc_mask_predictor.layer2.2.weight",
    "transformer.enc_mask_predictor.layer2.4.weight", "transformer.enc_output.weight",
    "transformer.enc_output.bias", "transformer.encoder.enhance_MCSP.0.weight",
    "transformer.encoder.enhance_MCSP.0.bias", "transformer.tgt_embed.weight",
    "transformer.level_embeds",
    "transformer.encoder.layers.0.attentions.1.sampling_offsets.weight",
    "transformer.encoder.layers.0.attentions.1.attention_weights.weight",
    "transformer.encoder.layers.5.attentions.1.sampling_offsets.weight",
    "transformer.encoder.layers.5.attentions.1.attention_weights.weight",
    "transformer.encoder.layers.0.attentions.0.attn.in_proj_weight",
    "transformer.decoder.layers.5.attentions.1.value_proj.weight",
    "transformer.decoder.bbox_embed.6.layers.2.weight",
    "transformer.decoder.bbox_embed.6.layers.2.bias", "neck.convs.0.conv.weight",
    "backbone.res5.2.conv3.weight", "backbone.res2.0.conv1.weight")


# ------------------------------------------------------------------------------------------------
# Environment

def configure_cpu(threads: int = 2, capability: Optional[str] = "avx2"):
  """Pin the CPU kernels (before torch is imported) and the thread count (the reference used AVX2
  kernels, 2 threads); returns the torch module."""
  if capability:
    if "torch" in sys.modules:
      raise RuntimeError("configure_cpu(capability=...) must run before torch is imported")
    os.environ["ATEN_CPU_CAPABILITY"] = capability.lower()
    if capability.lower() == "avx2":
      os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
  import torch
  torch.set_num_threads(threads)
  return torch


def environment_info(threads):
  import torch
  info = dict(torch=torch.__version__, threads=threads, python=platform.python_version(),
              numpy=np.__version__, machine=platform.machine(),
              torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
              env={k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")})
  for name in ("detectron2", "detrex", "scipy", "torchvision"):
    try:
      info[name] = __import__(name).__version__
    except Exception:  # pragma: no cover - informational only
      info[name] = None
  return info


# ------------------------------------------------------------------------------------------------
# Inputs (parity/README §5)

def _gt_boxes(rng, h, w, n):
  """n boxes; box j uses size bucket j % 4: large, 100-200 px, 24-90 px, log-uniform."""
  boxes = []
  for j in range(n):
    bucket = j % 4
    if bucket == 0:
      bw, bh = rng.uniform(0.6, 0.95) * w, rng.uniform(0.6, 0.95) * h
    elif bucket == 1:
      bw, bh = rng.uniform(100, 200), rng.uniform(100, 200)
    elif bucket == 2:
      bw, bh = rng.uniform(24, 90), rng.uniform(24, 90)
    else:
      lo, hi = np.log(16.0), np.log(0.8 * min(h, w))
      bw, bh = np.exp(rng.uniform(lo, hi)), np.exp(rng.uniform(lo, hi))
    bw, bh = min(bw, w - 2.0), min(bh, h - 2.0)
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    boxes.append([x0, y0, x0 + bw, y0 + bh])
  return np.asarray(boxes, np.float32).reshape(n, 4)


def make_inputs(seed: int, eval_sizes, train_sizes=None, num_boxes=(3, 5), num_classes=80):
  """Random uint8 images (default_rng(1000+seed)) and boxes (default_rng(2000+seed))."""
  train_sizes = eval_sizes if train_sizes is None else train_sizes
  out = {}
  for prefix, sizes in (("", eval_sizes), ("train_", train_sizes)):
    rng = np.random.default_rng(1000 + seed)  # the same draws: equal sizes give equal images
    for i, (h, w) in enumerate(sizes):
      out[f"{prefix}image_{i}"] = rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)
    out[f"{prefix}image_sizes"] = np.asarray(sizes, np.int64)
  rng = np.random.default_rng(2000 + seed)
  for i, (h, w) in enumerate(train_sizes):
    n = num_boxes[i % len(num_boxes)]
    out[f"gt_boxes_xyxy_abs_{i}"] = _gt_boxes(rng, h, w, n)
    out[f"gt_labels_{i}"] = rng.integers(0, num_classes, size=(n,)).astype(np.int64)
  out["seed"] = np.asarray(seed, np.int64)
  return out


def load_inputs(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------------
# Model and weights (parity/README §2-4)

class DetrexNotImportable(RuntimeError):
  """The reference environment cannot import detrex's configs (a setup error, one line)."""


def build_model(config_path, detrex_root=None):
  """detrex LazyConfig -> model on the CPU with denoising off; returns (model, cfg, dn_number).

  detrex's configs import its `projects/` folder, which detrex's install does not install: the
  detrex checkout must be on PYTHONPATH (docs/reproducibility.md §1)."""
  if importlib.util.find_spec("projects") is None:
    raise DetrexNotImportable("detrex's projects/ folder is not importable: put the detrex "
                              "checkout on PYTHONPATH (PYTHONPATH=/path/to/detrex)")
  from detectron2.config import LazyConfig, instantiate
  config_path = Path(config_path)
  if detrex_root is not None and not config_path.is_absolute():
    config_path = Path(detrex_root).resolve() / config_path
  cfg = LazyConfig.load(str(config_path))
  cfg.model.device = "cpu"
  dn_number = int(cfg.model.dn_number)
  cfg.model.dn_number = 0
  return instantiate(cfg.model).to("cpu"), cfg, dn_number


def _is_norm_module(module):
  import torch.nn as nn
  return (isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase))
          or any(c.__name__ == "FrozenBatchNorm2d" for c in type(module).__mro__))


def _rule(model, key, tensor):
  import torch.nn as nn
  if not tensor.is_floating_point():
    return "int_buffer"
  module_name, _, leaf = key.rpartition(".")
  module = model.get_submodule(module_name) if module_name else model
  if leaf in ("running_var", "running_mean"):
    return leaf
  if isinstance(module, nn.Embedding) and leaf == "weight":
    return "embedding"
  if tensor.ndim == 1 and leaf == "weight" and _is_norm_module(module):
    return "norm_weight"
  if tensor.ndim <= 1:
    return "vec"
  return "fan_in"


def manifest_rows(model):
  """[key, shape, dtype, rule, alias_of] for every state_dict entry, in order; a key whose tensor
  is an earlier key's storage (a shared module reached through another path) is its alias."""
  rows, seen = [], {}
  for key, t in model.state_dict(keep_vars=True).items():
    ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
    alias = seen.setdefault(ident, key)
    rows.append([key, list(t.shape), str(t.dtype).replace("torch.", ""), _rule(model, key, t),
                 alias if alias != key else None])
  return rows


def apply_weight_rule(model, rows, seed):
  """Overwrite every float entry by the deterministic rule (canonical keys; aliases follow)."""
  import torch
  sd = model.state_dict(keep_vars=True)
  with torch.no_grad():
    for key, shape, _, rule, alias in rows:
      if alias is not None or rule == "int_buffer":
        continue
      sd[key].copy_(torch.from_numpy(rule_value(key, shape, rule, seed)))


def load_checkpoint(model, path):
  """A detrex/detectron2 checkpoint (.pth with a "model" entry, or a bare state_dict)."""
  import torch
  obj = torch.load(str(path), map_location="cpu", weights_only=False)
  sd = obj.get("model", obj) if isinstance(obj, dict) else obj
  missing, unexpected = model.load_state_dict(sd, strict=False)
  return dict(missing=list(missing), unexpected=list(unexpected))


# ------------------------------------------------------------------------------------------------
# Instrumentation of one forward call

def _np(t):
  import torch
  if isinstance(t, torch.Tensor):
    t = t.detach().cpu()
    if t.dtype == torch.int32:
      t = t.long()
    return t.numpy().copy()
  return np.asarray(t)


def _patch(owner, name, value, on_exit):
  """owner.name = value; `on_exit` receives the undo (an instance attribute is deleted again, so
  the class's method shows through). Returns the original."""
  orig, own = getattr(owner, name), name in vars(owner)
  setattr(owner, name, value)
  on_exit(lambda: setattr(owner, name, orig) if own else delattr(owner, name))
  return orig


def _wrap(owner, name, record, on_exit):
  """Wrap owner.name so that every call also hands (args, output) to `record`."""
  orig = getattr(owner, name)

  def wrapper(*args, **kwargs):
    out = orig(*args, **kwargs)
    record(args, out)
    return out
  _patch(owner, name, wrapper, on_exit)


@contextlib.contextmanager
def cpu_device_shim():
  """Map `.cuda()` and `.to("cuda")` to the CPU while detrex's DN code runs (no source patch)."""
  import torch

  def is_cuda(a):
    return ((isinstance(a, str) and a.startswith("cuda"))
            or (isinstance(a, torch.device) and a.type == "cuda"))

  def to(self, *args, **kwargs):
    args = tuple("cpu" if is_cuda(a) else a for a in args)
    if is_cuda(kwargs.get("device")):
      kwargs["device"] = "cpu"
    return orig_to(self, *args, **kwargs)

  with contextlib.ExitStack() as stack:
    _patch(torch.Tensor, "cuda", lambda self, *args, **kwargs: self, stack.callback)
    orig_to = _patch(torch.Tensor, "to", to, stack.callback)
    yield


# The `torch.topk` calls that teacher forcing replaces, by phase, and their key in `forced`.
_FORCED_KEY = {"cascade": "fg_inds", "oesm": "oesm_sel_local", "two_stage": "enc_topk_proposals"}


class Instrument:
  """Hooks, wrappers and a recording/forcing `torch.topk` around one detrex forward call.

  forced: None, or dict(fg_inds=[K_l arrays], oesm_sel_local=[arrays], enc_topk_proposals=array)
  with the indices to return from the corresponding `torch.topk` calls (values are gathered from
  the real input, so they stay differentiable).
  """

  def __init__(self, model, forced=None):
    self.model, self.forced = model, forced
    self.rec = dict(topk=[], mcsp=[], proposals=[], aux=[], pos=[], oesm={}, matches=[],
                    rand=[], randint=[])
    self._undo = []

  def _forced_indices(self, phase):
    key = _FORCED_KEY.get(phase[0])
    if self.forced is None or key is None:
      return None
    return self.forced[key][phase[1]] if len(phase) > 1 else self.forced[key]

  def _topk(self, input, k, dim=-1, largest=True, sorted=True, **kwargs):
    import torch
    phase = self.phase
    if phase[0] == "cascade":
      phase = ("cascade", self.cascade_count)
      self.cascade_count += 1
    idx = self._forced_indices(phase)
    if idx is not None:
      idx = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=input.device)
      if idx.shape[dim] != k:
        raise ValueError(f"forced indices for {phase} have {idx.shape[dim]} entries, topk k={k}")
      result = (input.gather(dim, idx), idx)
    else:
      result = self._orig_topk(input, k, dim=dim, largest=largest, sorted=sorted, **kwargs)
    self.rec["topk"].append((phase, input.detach().clone(), result[1].detach().clone()))
    return result

  def _hook(self, module, fn, pre=False, kwargs=False):
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    self._undo.append(register(fn, with_kwargs=kwargs).remove)

  def __enter__(self):
    import torch
    m, t, rec, undo = self.model, self.model.transformer, self.rec, self._undo.append
    self.phase = ("outside",)
    self.cascade_count = 0
    self._orig_topk = _patch(torch, "topk", self._topk, undo)

    self._hook(m.backbone, lambda mod, a, out: rec.__setitem__(
        "backbone", {k: v.detach() for k, v in out.items()}))
    self._hook(m.neck, lambda mod, a, out: rec.__setitem__("neck", [v.detach() for v in out]))
    self._hook(m.position_embedding, lambda mod, a, out: rec["pos"].append(out.detach()))

    def transformer_pre(mod, args, kwargs):
      self.phase = ("cascade",)
      rec["level_masks"] = [x.detach() for x in args[1]]
    self._hook(t, transformer_pre, pre=True, kwargs=True)

    def transformer_post(mod, args, out):
      self.phase = ("inference",)
      rec["transformer_out"] = tuple(x.detach() for x in out)
    self._hook(t, transformer_post)

    def encoder_pre(mod, args, kwargs):
      rec["encoder_kwargs"] = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
                               for k, v in kwargs.items()}
    self._hook(t.encoder, encoder_pre, pre=True, kwargs=True)
    self._hook(t.encoder, lambda mod, a, out: setattr(self, "phase", ("two_stage",)))

    for l, layer in enumerate(t.encoder.layers):
      def layer_pre(mod, args, kwargs, l=l):
        self.phase = ("oesm", l)
        fg_pre, score = args[0].detach(), args[1].detach()
        mx = score.max(-1)
        rec["oesm"][l] = dict(score_max=mx[0], score_argmax=mx[1], mc=mx[0] * fg_pre)
      def layer_post(mod, args, kwargs, out, l=l):
        rec["oesm"][l]["out_rownorm"] = out.detach().norm(dim=-1)
      self._hook(layer, layer_pre, pre=True, kwargs=True)
      self._hook(layer, layer_post, kwargs=True)

    mcsp = {id(x): x for x in list(t.encoder.enhance_MCSP) + [t.decoder.class_embed[-1]]}
    for module in mcsp.values():
      self._hook(module, lambda mod, a, out: rec["mcsp"].append(out.detach()))

    _wrap(t, "gen_encoder_output_proposals", lambda a, out: rec["proposals"].append(
        (a[0].detach(), out[0].detach(), out[1].detach(), out[2].detach())), undo)
    _wrap(m, "_set_aux_loss", lambda a, out: rec["aux"].append(
        (a[0].detach(), a[1].detach())), undo)
    # Copied at once: detectron2's postprocessing rescales and clips these boxes in place.
    _wrap(m, "inference", lambda a, out: rec.__setitem__("inference", _detection_arrays(
        "infer", out)), undo)
    _wrap(m, "prepare_targets", lambda a, out: rec.__setitem__("targets", [
        dict(boxes=_np(x["boxes"]), labels=_np(x["labels"])) for x in out]), undo)
    if hasattr(m, "criterion"):
      self._instrument_criterion(m.criterion)
    self._instrument_cdn(torch, m)
    return self

  def _instrument_criterion(self, crit):
    rec, undo = self.rec, self._undo.append
    _wrap(crit, "forward", lambda a, losses: rec.__setitem__(
        "loss_raw", {k: float(v.detach()) for k, v in losses.items()}), undo)
    self._hook(crit.matcher, lambda mod, a, out: rec["matches"].append(
        [(_np(s), _np(g)) for s, g in out]))
    if hasattr(crit, "target_layer"):
      def gen_targets(mod, args, out):
        rec["gen_targets"] = dict(srcs_shapes=[tuple(s.shape[-2:]) for s in args[0]],
                                  boxes=_np(args[1]), classes=_np(args[2]), labels=_np(out),
                                  strides=list(mod.strides),
                                  limit_range=[list(r) for r in mod.limit_range])
      self._hook(crit.target_layer, gen_targets)
    for cls in type(crit).__mro__:
      module = sys.modules.get(cls.__module__)
      if module is not None and hasattr(module, "compute_cls_loss"):
        _wrap(module, "compute_cls_loss", lambda a, out: rec.__setitem__(
            "select_loss_per_image", _np(out).astype(np.float64)), undo)
        break

  def _instrument_cdn(self, torch, m):
    """The random draws, noised boxes and label embeddings of `prepare_for_cdn`, and its output."""
    rec, model_module = self.rec, sys.modules[type(m).__module__]
    orig_cdn = m.prepare_for_cdn

    def prepare_for_cdn(*args, **kwargs):
      with contextlib.ExitStack() as stack:
        _wrap(torch, "rand_like", lambda a, out: rec["rand"].append(_np(out)), stack.callback)
        _wrap(torch, "randint_like", lambda a, out: rec["randint"].append(_np(out)),
              stack.callback)
        _wrap(model_module, "inverse_sigmoid", lambda a, out: rec.__setitem__(
            "dn_inverse_sigmoid", (_np(a[0]), _np(out))), stack.callback)
        stack.callback(m.label_enc.register_forward_hook(lambda mod, a, out: rec.__setitem__(
            "dn_label_enc", (_np(a[0]), _np(out)))).remove)
        out = orig_cdn(*args, **kwargs)
      if out[0] is not None:
        rec["dn_out"] = dict(input_query_label=_np(out[0]), input_query_bbox=_np(out[1]),
                             attn_mask=_np(out[2]), dn_meta=dict(out[3]))
      return out
    _patch(m, "prepare_for_cdn", prepare_for_cdn, self._undo.append)

  def __exit__(self, *exc):
    for undo in reversed(self._undo):
      undo()
    self._undo = []
    return False

  def topk_calls(self, kind):
    return [(phase, x, idx) for phase, x, idx in self.rec["topk"] if phase[0] == kind]


def transformer_arrays(ins: Instrument) -> Dict[str, np.ndarray]:
  """The transformer-side arrays shared by forward_eval / losses_train / dn_train."""
  rec, kw, out = ins.rec, ins.rec["encoder_kwargs"], ins.rec["transformer_out"]
  shapes, fg = _np(kw["spatial_shapes"]), _np(out[5])[..., 0]
  a = dict(spatial_shapes=shapes, level_start_index=_np(kw["level_start_index"]),
           valid_ratios=_np(kw["valid_ratios"]),
           padding_mask_flat=_np(kw["query_key_padding_mask"]).astype(bool), fg_score=fg,
           fg_score_masked=_np(kw["backbone_mask_prediction"]))
  starts = np.concatenate([[0], np.cumsum(shapes.prod(1))])
  for l in reversed(range(len(shapes))):
    a[f"fg_score_lvl{l}"] = fg[:, starts[l]:starts[l + 1]].copy()
  a["focus_token_nums"] = _np(kw["focus_token_nums"]).astype(np.int64)
  a["valid_token_nums"] = _np(rec["proposals"][0][3]).astype(np.int64)
  oesm_topk = {phase[1]: idx for phase, _, idx in ins.topk_calls("oesm")}
  for l, x in enumerate(kw["foreground_inds"]):
    o, inds, sel = rec["oesm"][l], _np(x), _np(oesm_topk[l])
    mc = _np(o["mc"])
    a[f"fg_inds_layer{l}"] = inds
    a[f"oesm_mc_score_layer{l}"] = mc
    a[f"oesm_score_tgt_max_layer{l}"] = _np(o["score_max"])
    a[f"oesm_score_tgt_argmax_layer{l}"] = _np(o["score_argmax"])
    a[f"oesm_sel_local_layer{l}"] = sel
    a[f"oesm_sel_global_layer{l}"] = np.take_along_axis(inds, sel, axis=1)
    a[f"oesm_sel_mc_score_layer{l}"] = np.take_along_axis(mc, sel, axis=1)
    a[f"enc_layer{l}_out_rownorm"] = _np(o["out_rownorm"])
  (_, key, idx), = ins.topk_calls("two_stage")
  memory, _, proposals, _ = rec["proposals"][-1]
  cls, coord = rec["aux"][-1]
  a.update(enc_output_proposals_valid=~_np(proposals.isinf().any(-1)),
           fts_output_memory_rownorm=_np(rec["proposals"][0][1].norm(dim=-1)),
           enc_outputs_class_max_all=_np(key), enc_topk_proposals=_np(idx),
           enc_pred_logits=_np(rec["mcsp"][-1]), enc_pred_boxes=_np(out[4]),
           init_reference=_np(out[1]), inter_references=_np(out[2]),
           dec_hidden_rownorm=_np(out[0].norm(dim=-1)), memory_rownorm=_np(memory.norm(dim=-1)),
           pred_logits=_np(cls[-1]), pred_boxes=_np(coord[-1]), aux_pred_logits=_np(cls[:-1]),
           aux_pred_boxes=_np(coord[:-1]))
  return a


def feature_arrays(ins: Instrument) -> Dict[str, np.ndarray]:
  """Backbone (every 8th channel of image 0 + channel means), neck (every 2nd), pos embed."""
  rec, a = ins.rec, {}
  for name, f in rec["backbone"].items():
    a[f"backbone_{name}_img0_ch8"] = _np(f[0, ::8])
    a[f"backbone_{name}_chanmean"] = _np(f.mean(dim=(2, 3)))
    a[f"backbone_{name}_shape"] = np.asarray(f.shape, np.int64)
  for l, f in enumerate(rec["neck"]):
    a[f"neck_lvl{l}_img0_ch2"] = _np(f[0, ::2])
    a[f"neck_lvl{l}_chanmean"] = _np(f.mean(dim=(2, 3)))
  a["pos_embed_lvl0_img0_ch8"] = _np(rec["pos"][0][0, ::8])
  return a


def match_arrays(matches, prefix=""):
  a = {}
  for name, per_image in zip(MATCH_NAMES, matches):
    for b, (src, tgt) in enumerate(per_image):
      a[f"{prefix}match_{name}_src_{b}"] = src.astype(np.int64)
      a[f"{prefix}match_{name}_tgt_{b}"] = tgt.astype(np.int64)
  return a


def loss_arrays(ins, loss_dict, weight_dict, with_float32_total=False):
  names = list(loss_dict.keys())
  weighted = np.asarray([float(loss_dict[k].detach()) for k in names], np.float64)
  total = float(sum(loss_dict.values()).detach())
  # losses_train.npz: the float64 sum of the weighted terms (public set's convention); the
  # grads / DN files hold the float32 sum that backward() starts from, and its float64 copy.
  a = dict(loss_names=np.asarray(names),
           loss_raw=np.asarray([ins.rec["loss_raw"][k] for k in names], np.float64),
           loss_weighted=weighted,
           loss_weight=np.asarray([float(weight_dict.get(k, 1.0)) for k in names]),
           loss_total=np.asarray(total if with_float32_total else float(np.sum(weighted)),
                                 np.float64))
  if with_float32_total:
    a["loss_total_float32"] = np.asarray(total, np.float32)
  return a


# ------------------------------------------------------------------------------------------------
# Runs

def _batched(inputs, train, images_prefix):
  import torch
  from detectron2.structures import Boxes, Instances
  n = len([k for k in inputs if k.startswith(images_prefix + "image_")
           and k[len(images_prefix + "image_"):].isdigit()])
  batch = []
  for i in range(n):
    img = inputs[f"{images_prefix}image_{i}"]
    h, w = img.shape[1:]
    item = {"image": torch.from_numpy(np.ascontiguousarray(img)).float()}
    if train:
      inst = Instances((h, w))
      inst.gt_boxes = Boxes(torch.from_numpy(inputs[f"gt_boxes_xyxy_abs_{i}"]))
      inst.gt_classes = torch.from_numpy(inputs[f"gt_labels_{i}"]).long()
      item["instances"] = inst
    else:
      item["height"], item["width"] = h, w
    batch.append(item)
  return batch


def run_eval(model, inputs, forced=None):
  import torch
  model.eval()
  with torch.no_grad(), cpu_device_shim(), Instrument(model, forced) as ins:
    t0 = time.time()
    results = model(_batched(inputs, False, ""))
    seconds = time.time() - t0
  a = transformer_arrays(ins)
  a["memory"] = _np(ins.rec["proposals"][-1][0])
  a.update(feature_arrays(ins))
  a.update(ins.rec["inference"])
  a.update(_detection_arrays("det", [r["instances"] for r in results]))
  return a, seconds


def _detection_arrays(prefix, instances):
  """Scores, labels and xyxy boxes of detectron2 `Instances`, one per image."""
  a = {}
  for i, r in enumerate(instances):
    a[f"{prefix}_scores_{i}"] = _np(r.scores)
    a[f"{prefix}_labels_{i}"] = _np(r.pred_classes).astype(np.int64)
    a[f"{prefix}_boxes_xyxy_{i}"] = _np(r.pred_boxes.tensor)
  return a


def run_train(model, inputs, forced=None, dn_number=0, dn_seed=None, backward=False):
  """One model.train() forward (autograd on); returns (ins, loss_dict, seconds)."""
  import torch
  model.train()
  model.dn_number = dn_number
  model.zero_grad(set_to_none=True)
  batch = _batched(inputs, True, "train_")
  with cpu_device_shim(), Instrument(model, forced) as ins:
    if dn_seed is not None:
      torch.manual_seed(dn_seed)
    t0 = time.time()
    loss_dict = model(batch)
    seconds = {"forward": time.time() - t0}
    if backward:
      t0 = time.time()
      sum(loss_dict.values()).backward()
      seconds["backward"] = time.time() - t0
  model.dn_number = 0
  return ins, loss_dict, seconds


def train_arrays(ins, loss_dict, weight_dict, with_aux_logits):
  a = transformer_arrays(ins)
  if not with_aux_logits:
    a.pop("aux_pred_logits")
  a.update(loss_arrays(ins, loss_dict, weight_dict, with_float32_total=with_aux_logits))
  a.update(match_arrays(ins.rec["matches"]))
  return a


def foreground_arrays(ins):
  g = ins.rec["gen_targets"]
  a = dict(strides=np.asarray(g["strides"], np.int64),
           limit_range=np.asarray(g["limit_range"], np.int64),
           feat_shapes=np.asarray(g["srcs_shapes"], np.int64),
           gt_boxes_xyxy_abs_padded=g["boxes"].astype(np.float32),
           gt_classes_padded=g["classes"].astype(np.float32))
  labels = g["labels"].reshape(g["labels"].shape[0], -1).astype(np.int64)
  a["labels_flat"] = labels
  start = 0
  for l, ((h, w), s) in enumerate(zip(g["srcs_shapes"], g["strides"])):
    a[f"labels_lvl{l}"] = labels[:, start:start + h * w].reshape(-1, h, w)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    a[f"coords_lvl{l}"] = np.stack([xs.ravel() * s + s // 2, ys.ravel() * s + s // 2],
                                   -1).astype(np.float32)
    start += h * w
  per_image = ins.rec["select_loss_per_image"].reshape(-1)
  a["select_loss_per_image"] = per_image
  a["select_loss"] = np.asarray(per_image.mean(), np.float64)
  a["num_pos"] = (labels > 0).sum(1).astype(np.int64)
  return a


def dn_arrays(ins, label_noise_ratio=0.5):
  """Draws, noised queries, mask and DN decoder outputs of a DN-on run (training_extras §2-6)."""
  rec, dn = ins.rec, ins.rec["dn_out"]
  meta, targets = dn["dn_meta"], rec["targets"]
  known_num = np.asarray([len(t["labels"]) for t in targets], np.int64)
  n, n_max = int(known_num.sum()), int(known_num.max())
  groups = int(meta["dn_num"])
  copies = 2 * groups
  labels = np.concatenate([t["labels"] for t in targets]).astype(np.int64)
  boxes = np.concatenate([t["boxes"] for t in targets]).astype(np.float32)
  bid = np.concatenate([np.full(k, i, np.int64) for i, k in enumerate(known_num)])
  m_rows = copies * n
  known_labels, known_bid = np.tile(labels, copies), np.tile(bid, copies)
  known_boxes = np.tile(boxes, (copies, 1))
  positive = (np.arange(n)[None] + (np.arange(groups) * 2 * n)[:, None]).reshape(-1)
  negative = positive + n
  is_negative = np.zeros(m_rows, bool)
  is_negative[negative] = True
  p, rand_part = rec["rand"]
  new_label, sign01 = rec["randint"]
  chosen = np.nonzero(p < np.float32(label_noise_ratio * 0.5))[0]
  dense = np.full(m_rows, -1, np.int64)
  dense[chosen] = new_label
  sign = sign01 * np.float32(2.0) - np.float32(1.0)
  part = ((rand_part + is_negative[:, None].astype(np.float32)) * sign).astype(np.float32)
  half = known_boxes[:, 2:] / 2
  xyxy = np.concatenate([known_boxes[:, :2] - half, known_boxes[:, :2] + half], 1)
  xyxy = np.clip(xyxy + part * np.concatenate([half, half], 1), 0.0, 1.0).astype(np.float32)
  local = np.concatenate([np.arange(k) for k in known_num]).astype(np.int64)
  map_known = np.concatenate([local + n_max * c for c in range(copies)])
  width = int(meta["single_padding"])
  a = dict(dn_num_groups=np.asarray(groups, np.int64),
           dn_single_padding=np.asarray(n_max, np.int64),
           dn_pad_size=np.asarray(width * groups, np.int64),
           dn_meta_single_padding=np.asarray(width, np.int64),
           dn_meta_dn_num=np.asarray(groups, np.int64), dn_known_num=known_num,
           dn_known_labels=known_labels, dn_known_bid=known_bid, dn_known_bboxs=known_boxes,
           dn_known_labels_noised=rec["dn_label_enc"][0].astype(np.int64),
           dn_known_bbox_noised_cxcywh=rec["dn_inverse_sigmoid"][0],
           dn_known_bbox_noised_xyxy=xyxy, dn_map_known_indice=map_known,
           dn_positive_idx=positive, dn_negative_idx=negative, dn_is_negative=is_negative,
           dn_label_chosen_indice=chosen.astype(np.int64),
           dn_input_label_embed=rec["dn_label_enc"][1],
           dn_input_bbox_embed=rec["dn_inverse_sigmoid"][1],
           input_query_label=dn["input_query_label"], input_query_bbox=dn["input_query_bbox"],
           attn_mask=dn["attn_mask"].astype(bool), draw0_label_flip_p=p,
           draw1_label_new_label=new_label.astype(np.int64), draw2_box_rand_sign01=sign01,
           draw3_box_rand_part=rand_part, draw1_label_new_label_dense=dense, dn_rand_sign=sign,
           dn_rand_part_final=part)
  cls, coord = rec["aux"][0]
  a["dn_pred_logits_all_layers"], a["dn_pred_boxes_all_layers"] = _np(cls), _np(coord)
  for b, k in enumerate(known_num):
    g, t = np.meshgrid(np.arange(groups), np.arange(k), indexing="ij")
    a[f"dn_match_src_{b}"] = (g * width + t).reshape(-1).astype(np.int64)
    a[f"dn_match_tgt_{b}"] = t.reshape(-1).astype(np.int64)
  return a


def gradient_arrays(model, full_names: Sequence[str], max_full_numel: Optional[int] = None):
  """Sum, abs sum and norm of every trainable parameter's gradient; full arrays of `full_names`."""
  trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  stats, full = [], {}
  for name, p in trainable:
    if p.grad is None:
      stats.append([0.0, 0.0, 0.0])
      continue
    g64 = p.grad.detach().double()
    stats.append([float(g64.sum()), float(g64.abs().sum()), float(g64.norm())])
    if name in full_names and (max_full_numel is None or p.grad.numel() <= max_full_numel):
      full[f"grad__{name}"] = _np(p.grad)
  frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
  return dict(param_names=np.asarray([n for n, _ in trainable]),
              grad_stats=np.asarray(stats, np.float64),
              grad_present=np.asarray([p.grad is not None for _, p in trainable], bool),
              frozen_param_names=np.asarray(frozen), **full)


def forced_from_arrays(a, num_layers):
  return dict(fg_inds=[a[f"fg_inds_layer{l}"] for l in range(num_layers)],
              oesm_sel_local=[a[f"oesm_sel_local_layer{l}"] for l in range(num_layers)],
              enc_topk_proposals=a["enc_topk_proposals"])


def msda_arrays(seed, shapes=((20, 30), (10, 15), (5, 8), (3, 4)), batch=2, heads=8, dim=32,
                queries=50, points=4, reuse=None):
  """Standalone deformable-attention check (ms_deform_attn.npz): inputs from default_rng(4000+seed),
  or those and the weights of `reuse` (an ms_deform_attn.npz dict, to re-record its outputs)."""
  import torch
  from detrex.layers import MultiScaleDeformableAttention
  from detrex.layers.multi_scale_deform_attn import multi_scale_deformable_attn_pytorch
  embed, levels = heads * dim, len(shapes)
  if reuse is not None:
    a = {k: reuse[k] for k in ("value", "spatial_shapes", "level_start_index",
                               "sampling_locations", "attention_logits", "attention_weights",
                               "module_query", "module_query_pos", "module_key_padding_mask",
                               "module_ref2", "module_ref4")}
    a.update({k: reuse[k] for k in reuse if k.startswith("module_") and "__" in k})
  else:
    rng = np.random.default_rng(4000 + seed)
    n_tok = int(sum(h * w for h, w in shapes))
    a = {"value": rng.normal(size=(batch, n_tok, heads, dim)).astype(np.float32),
         "spatial_shapes": np.asarray(shapes, np.int64)}
    a["level_start_index"] = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])[:-1]])
    loc = rng.uniform(-0.1, 1.1, size=(batch, queries, heads, levels, points, 2))
    for j, xy in enumerate(((0.0, 0.0), (1.0, 1.0), (-0.1, 0.5), (0.5, 1.1))[:points]):
      loc[0, 0, 0, :, j] = xy
    a["sampling_locations"] = loc.astype(np.float32)
    logits = rng.normal(size=(batch, queries, heads, levels * points)).astype(np.float32)
    a["attention_logits"] = logits
    a["attention_weights"] = _np(torch.from_numpy(logits).softmax(-1).view(
        batch, queries, heads, levels, points))
    for name, shape in (("sampling_offsets", (heads * levels * points * 2, embed)),
                        ("attention_weights", (heads * levels * points, embed)),
                        ("value_proj", (embed, embed)), ("output_proj", (embed, embed))):
      a[f"module_{name}__weight"] = rule_value(f"msda_module.{name}.weight", shape, "fan_in",
                                               seed)
      a[f"module_{name}__bias"] = rule_value(f"msda_module.{name}.bias", shape[:1], "vec", seed)
    a["module_query"] = rng.normal(size=(batch, queries, embed)).astype(np.float32)
    a["module_query_pos"] = rng.normal(size=(batch, queries, embed)).astype(np.float32)
    mask = np.zeros((batch, n_tok), bool)
    for (h, w), s in zip(shapes, a["level_start_index"]):
      mask[1, s:s + h * w] = np.tile(np.arange(w) >= w - 3, h)  # image 1: last 3 columns padded
    a["module_key_padding_mask"] = mask
    a["module_ref2"] = np.repeat(rng.uniform(0, 1, size=(batch, queries, 1, 2)), levels,
                                 2).astype(np.float32)
    ref4 = np.concatenate([rng.uniform(0.1, 0.9, size=(batch, queries, 1, 2)),
                           rng.uniform(0.02, 0.5, size=(batch, queries, 1, 2))], -1)
    a["module_ref4"] = np.repeat(ref4, levels, 2).astype(np.float32)
  t = lambda x: torch.from_numpy(np.ascontiguousarray(x))
  batch, _, heads, dim = a["value"].shape
  with torch.no_grad():
    a["output"] = _np(multi_scale_deformable_attn_pytorch(
        t(a["value"]), t(a["spatial_shapes"]), t(a["sampling_locations"]),
        t(a["attention_weights"])))
    module = MultiScaleDeformableAttention(
        embed_dim=heads * dim, num_heads=heads, num_levels=len(a["spatial_shapes"]),
        num_points=a["sampling_locations"].shape[4], batch_first=True)
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
      getattr(module, name).weight.copy_(t(a[f"module_{name}__weight"]))
      getattr(module, name).bias.copy_(t(a[f"module_{name}__bias"]))
    module.eval()
    value = t(a["value"]).reshape(batch, -1, heads * dim)
    for ref in ("ref2", "ref4"):
      a[f"module_out_{ref}"] = _np(module(
          query=t(a["module_query"]), value=value, identity=None,
          query_pos=t(a["module_query_pos"]), key_padding_mask=t(a["module_key_padding_mask"]),
          reference_points=t(a[f"module_{ref}"]), spatial_shapes=t(a["spatial_shapes"]),
          level_start_index=t(a["level_start_index"])))
  return a


# ------------------------------------------------------------------------------------------------
# The whole set

def _save(out_dir, name, arrays, drop=()):
  np.savez_compressed(Path(out_dir) / name, **{k: v for k, v in arrays.items() if k not in drop})


def _loss_dict(a, values):
  return {str(k): float(v) for k, v in zip(a["loss_names"], a[values])}


def record(out_dir, config, seed=0, eval_sizes=((320, 480), (256, 384)), train_sizes=None,
           parts=PARTS, detrex_root=None, checkpoint=None, inputs_from=None, threads=2,
           set_name=None, compact=False, msda_from=None, force_eval_from=None, log=print):
  """Record one set into out_dir; returns meta (also written to meta.json)."""
  import torch
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  t_start = time.time()
  model, cfg, dn_number = build_model(config, detrex_root)
  rows = manifest_rows(model)
  meta = dict(set=set_name or out_dir.name, seed=int(seed), config=str(config),
              recorder="focus_detr_jax.reference (scripts/record_reference.py)",
              pinned_commits=PINNED_COMMITS, environment=environment_info(threads),
              parts=list(parts), compact=bool(compact))
  if checkpoint is not None:
    info = load_checkpoint(model, checkpoint)
    rows = [[k, s, d, "checkpoint" if r != "int_buffer" else r, al] for k, s, d, r, al in rows]
    meta["weights"] = dict(source="checkpoint", file=Path(checkpoint).name,
                           sha256=sha256(checkpoint), **info)
  else:
    apply_weight_rule(model, rows, seed)
    meta["weights"] = dict(source="rule", rule="parity/README §4", seed=int(seed))
  (out_dir / "state_dict_manifest.json").write_text(json.dumps(rows))
  meta["weight_fingerprint"] = {
      k: [float(t.detach().double().sum()), float(t.detach().double().abs().sum())]
      for k, t in model.state_dict(keep_vars=True).items()}
  meta["manifest_rule_counts"] = dict(sorted(collections.Counter(r[3] for r in rows).items()))

  inputs = (load_inputs(inputs_from) if inputs_from is not None
            else make_inputs(seed, eval_sizes, train_sizes))
  inputs["pixel_mean"] = np.asarray(list(cfg.model.pixel_mean), np.float32)
  inputs["pixel_std"] = np.asarray(list(cfg.model.pixel_std), np.float32)
  inputs["seed"] = np.asarray(seed, np.int64)
  meta["eval_sizes"] = inputs["image_sizes"].tolist()
  if "train_image_sizes" in inputs:
    meta["train_sizes"] = inputs["train_image_sizes"].tolist()
  num_layers = len(model.transformer.encoder.layers)
  seconds = {}
  training_meta = dict(seed=int(seed), config=str(config), dn_number=dn_number,
                       dn_torch_manual_seed=3000 + int(seed), **environment_info(threads))

  if "eval" in parts:
    log("eval forward ...")
    forced = None
    if force_eval_from is not None:  # teacher-force the eval top-k's to another set's indices
      forced = forced_from_arrays(load_inputs(Path(force_eval_from) / "forward_eval.npz"),
                                  num_layers)
      meta["eval_topk_forced_from"] = str(force_eval_from)
    a, seconds["eval"] = run_eval(model, inputs, forced=forced)
    meta["shapes_eval"] = a["spatial_shapes"].tolist()
    _save(out_dir, "forward_eval.npz", a, drop=_COMPACT_DROP["eval"] if compact else ())

  train_ref = forced = None
  if any(p in parts for p in ("train", "grads", "dn")):
    log("train forward (natural top-k, DN off) ...")
    ins, loss_dict, seconds["train"] = run_train(model, inputs)
    train_ref = a = train_arrays(ins, loss_dict, model.criterion.weight_dict, False)
    for l, mask in enumerate(ins.rec["level_masks"]):
      a[f"padding_mask_lvl{l}"] = _np(mask).astype(bool)
    for i, t in enumerate(ins.rec["targets"]):
      a[f"target_boxes_cxcywh_{i}"] = inputs[f"gt_boxes_cxcywh_{i}"] = t["boxes"].astype(np.float32)
      a[f"target_labels_{i}"] = t["labels"].astype(np.int64)
    meta.update(shapes_train=a["spatial_shapes"].tolist(),
                loss_weighted=_loss_dict(a, "loss_weighted"), loss_raw=_loss_dict(a, "loss_raw"))
    if "train" in parts:
      _save(out_dir, "losses_train.npz", a)
      _save(out_dir, "foreground_labels.npz", foreground_arrays(ins))
    forced = forced_from_arrays(train_ref, num_layers)
    del ins, loss_dict

  full_limit = 40_000 if compact else None
  if "grads" in parts:
    log("train forward + backward (top-k forced, DN off) ...")
    ins, loss_dict, seconds["grads_dn_off"] = run_train(model, inputs, forced=forced,
                                                        backward=True)
    g = gradient_arrays(model, GRAD_FULL, full_limit)
    g.update({f"teacher_{k}": v for k, v in train_ref.items()
              if k.startswith(("fg_inds_layer", "oesm_sel_local_layer", "enc_topk_proposals"))})
    g.update(match_arrays(ins.rec["matches"], prefix="teacher_"))
    g.update(loss_arrays(ins, loss_dict, model.criterion.weight_dict, with_float32_total=True))
    training_meta.update(loss_dn_off=_loss_dict(g, "loss_raw"),
                         loss_total_dn_off=float(g["loss_total"]),
                         frozen=g["frozen_param_names"].tolist(),
                         n_trainable_params=len(g["param_names"]))
    _save(out_dir, "grads_train.npz", g)
    del ins, loss_dict

  if "dn" in parts:
    log(f"train forward + backward (top-k forced, DN on, dn_number={dn_number}) ...")
    ins, loss_dict, seconds["dn"] = run_train(model, inputs, forced=forced, dn_number=dn_number,
                                              dn_seed=3000 + int(seed), backward=True)
    a = train_arrays(ins, loss_dict, model.criterion.weight_dict, True)
    a.update(dn_arrays(ins))
    _save(out_dir, "dn_train.npz", a, drop=_COMPACT_DROP["dn"] if compact else ())
    training_meta.update(loss_dn_on_raw=_loss_dict(a, "loss_raw"),
                         loss_dn_on_weighted=_loss_dict(a, "loss_weighted"),
                         loss_total_dn_on=float(a["loss_total"]))
    _save(out_dir, "grads_train_dn.npz", gradient_arrays(
        model, GRAD_FULL + ("label_enc.weight",), full_limit))
    del ins, loss_dict

  if "msda" in parts:
    log("deformable attention ...")
    reuse = load_inputs(msda_from) if msda_from is not None else None
    kwargs = dict(shapes=((10, 15), (5, 8), (3, 4), (2, 2)), queries=20, dim=8) if compact else {}
    _save(out_dir, "ms_deform_attn.npz", msda_arrays(seed, reuse=reuse, **kwargs))

  _save(out_dir, "inputs.npz", inputs)
  seconds["total"] = time.time() - t_start
  meta.update(seconds=seconds, threads=threads, torch=torch.__version__)
  (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
  if "grads" in parts or "dn" in parts:
    training_meta.update(timings=seconds, topk_forced_to_stored_losses_train=True)
    (out_dir / "training_meta.json").write_text(json.dumps(training_meta, indent=1))
  return meta
