"""ImageNet backbone weights (torchvision, detectron2 model zoo, official Swin) -> our backbone.

Every format is first renamed to the detectron2 names that detrex uses under `backbone.`
(`torchvision`: `layer{n}.{b}.bn{k}.*` -> `res{n+1}.{b}.conv{k}.norm.*`, `downsample.{0,1}` ->
`shortcut(.norm)`; detectron2 pickles already use them), then mapped by the one name mapping of
`convert/detrex.py` (ResNet) or `convert/swin.py` (Swin). Classifiers, BatchNorm counters, Swin's
`attn_mask` and classification `norm` are skipped by name; Caffe2/MSRA ResNets (BGR input, stride
in the 1x1) are refused. docs/weights.md lists the formats; `convert/init.py` merges the result.
"""

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from focus_detr_jax.convert.detrex import (ConversionError, _transform, detrex_key_to_path,
                                           key_lines)
from focus_detr_jax.convert.swin import (_shape_problem, _window_of_table, index_problem,
                                         swin_key_to_path)

BACKBONE_FORMATS = ("torchvision", "detectron2", "swin", "detrex")
# Keys whose value wraps the weights in a checkpoint dict: detectron2/detrex/Swin `model`,
# mmcv/Lightning `state_dict`.
_WRAPPER_KEYS = ("model", "state_dict", "module")


class Caffe2WeightsError(ConversionError):
  """Caffe2/MSRA ResNet weights: BGR input and stride in the 1x1, not our ResNet."""


Row = Dict[str, Any]


def row(status, source=None, target=None, shape=None, reason=""):
  """One report line: status in {mapped, checked, skipped, reinitialised}."""
  return {"status": status, "source": source, "target": target,
          "shape": None if shape is None else tuple(int(s) for s in shape), "reason": reason}


def _is_array(v):
  return isinstance(v, np.ndarray) or (hasattr(v, "shape") and hasattr(v, "dtype"))


def unwrap_state_dict(obj, source: str = "") -> Tuple[Dict[str, np.ndarray], Dict[str, Any],
                                                      List[Row]]:
  """A loaded file (a state dict, bare or under `model` / `state_dict` / `module`) -> (flat state
  dict without a DataParallel `module.` prefix, metadata, skipped rows of the entries beside it)."""
  if not isinstance(obj, dict):
    raise ConversionError(f"{source}: expected a dict of weights, found {type(obj).__name__}")
  meta, rows = {}, []
  if obj and all(_is_array(v) for v in obj.values()):
    sd = obj
  else:
    wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
    if wrapper is None:
      raise ConversionError(
          f"{source}: cannot find the weights: top-level keys {sorted(map(str, obj))[:20]} hold "
          f"no state dict (expected arrays, or a dict under one of {list(_WRAPPER_KEYS)})")
    sd = obj[wrapper]
    for k, v in obj.items():
      if k == wrapper:
        continue
      if isinstance(v, (str, int, float, bool)) or v is None:
        meta[k] = v
      rows.append(row("skipped", source=str(k), reason=f"top-level entry beside '{wrapper}' "
                      "(training state or metadata, not weights)"))
  bad = [k for k, v in sd.items() if not _is_array(v)]
  if bad:
    raise ConversionError(f"{source}: {len(bad)} state dict entries are not arrays: "
                          + ", ".join(f"{k} ({type(sd[k]).__name__})" for k in bad[:20]))
  sd = {str(k): np.asarray(v) for k, v in sd.items()}
  if sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
    meta["stripped_prefix"] = "module."
  return sd, meta, rows


_CAFFE2_KEY = re.compile(r"^(conv1_w|conv1_b|res_conv1_bn_[sb]"
                         r"|res\d+_\d+_branch\d[abc]?(_bn)?_[wbs]|fc1000_[wb]|.*_momentum)$")


def caffe2_keys(state_dict) -> List[str]:
  """Keys named like Caffe2/Detectron1 blobs (`conv1_w`, `res2_0_branch2a_w`, ...)."""
  return [k for k in state_dict if _CAFFE2_KEY.match(k)]


def check_not_caffe2(state_dict, meta=None, source: str = ""):
  """Raise `Caffe2WeightsError` for Caffe2/MSRA ResNet weights, saying why."""
  keys = caffe2_keys(state_dict)
  author = str((meta or {}).get("__author__", ""))
  if keys or author.lower() in ("caffe2", "msra") or "blobs" in state_dict:
    found = ", ".join(keys[:4]) if keys else f"__author__ = {author!r}"
    raise Caffe2WeightsError(
        f"{source}: Caffe2/MSRA ResNet weights ({found}) are refused: that network takes BGR "
        "images in 0..255 with pixel std 1 and puts the stride-2 of each stage's first "
        "bottleneck in the 1x1 conv (stride_in_1x1), while this ResNet, like detrex's, takes RGB "
        "images normalised by the ImageNet mean/std and strides in the 3x3. Its weights would "
        "load without error and give a broken backbone. Use the torchvision weights instead: "
        "torchvision's resnet50/resnet101 .pth (--format torchvision) or detectron2's "
        "ImageNetPretrained/torchvision/R-50.pkl (--format detectron2).")


def detect_format(state_dict) -> str:
  """Best guess of the key layout: caffe2 | torchvision | detectron2 | swin | detrex | unknown."""
  keys = set(state_dict)
  if caffe2_keys(state_dict):
    return "caffe2"
  if any(k.startswith("transformer.") for k in keys) and any(k.startswith("backbone.")
                                                             for k in keys):
    return "detrex"
  if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
    return "torchvision"
  if any(re.match(r"^(backbone\.(bottom_up\.)?)?(stem\.conv1|res2\.0\.)", k) for k in keys):
    return "detectron2"
  if any(re.match(r"^(backbone\.)?patch_embed\.proj\.weight$", k) for k in keys):
    return "swin"
  return "unknown"


_CLASSIFIER = "ImageNet classifier head, not part of the detector"
_BN_COUNTER = "BatchNorm step counter, not a weight (FrozenBN has none)"
_BN_LEAF = r"(weight|bias|running_mean|running_var)"
# torchvision -> detectron2 names: (pattern, replacement) of the stem, and of a block's keys.
_TV_STEM = ((r"conv1\.weight", "conv1.weight"), (rf"bn1\.{_BN_LEAF}", r"conv1.norm.\1"))
_TV_BLOCK = ((r"conv(\d)\.weight", r"conv\1.weight"), (rf"bn(\d)\.{_BN_LEAF}", r"conv\1.norm.\2"),
             (r"downsample\.0\.weight", "shortcut.weight"),
             (rf"downsample\.1\.{_BN_LEAF}", r"shortcut.norm.\1"))


def _torchvision_name(key: str) -> Optional[str]:
  m = re.fullmatch(r"layer(\d)\.(\d+)\.(.+)", key)
  prefix, rest, rules = (f"res{int(m[1]) + 1}.{m[2]}.", m[3], _TV_BLOCK) if m else (
      "stem.", key, _TV_STEM)
  for pattern, replacement in rules:
    found = re.fullmatch(pattern, rest)
    if found:
      return prefix + found.expand(replacement)
  return None


def rename_to_detrex(state_dict, fmt: str) -> Tuple[Dict[str, Tuple[np.ndarray, str]],
                                                    List[Row], List[str]]:
  """Rename a backbone file's keys to detrex `backbone.*` keys.

  Returns ({detrex key: (array, source key)}, skipped rows, unknown source keys).
  """
  out, rows, unknown = {}, [], []

  def skip(k, reason):
    rows.append(row("skipped", source=k, shape=np.shape(state_dict[k]), reason=reason))

  if fmt == "torchvision":
    for k, v in state_dict.items():
      if k.endswith("num_batches_tracked"):
        skip(k, _BN_COUNTER)
      elif re.fullmatch(r"fc\.(weight|bias)", k):
        skip(k, _CLASSIFIER)
      else:
        name = _torchvision_name(k)
        if name is None:
          unknown.append(k)
        else:
          out["backbone." + name] = (v, k)
  elif fmt == "detectron2":
    prefix = next((p for p in ("backbone.bottom_up.", "backbone.")
                   if any(k.startswith(p) for k in state_dict)), "")
    for k, v in state_dict.items():
      if not k.startswith(prefix):
        skip(k, "outside the ResNet body (another part of a detection model)")
        continue
      name = k[len(prefix):]
      if name.endswith("num_batches_tracked"):
        skip(k, _BN_COUNTER)
      elif re.fullmatch(r"(stem\.)?(fc|linear)\d*\.(weight|bias)", name):
        skip(k, _CLASSIFIER)
      elif re.fullmatch(r"(stem\.conv1|res\d\.\d+\.(conv\d|shortcut))(\.norm)?\."
                        r"(weight|bias|running_mean|running_var)", name):
        out["backbone." + name] = (v, k)
      elif prefix and not re.match(r"(stem|res\d)\.", name):
        skip(k, "outside the ResNet body (another part of a detection model)")
      else:
        unknown.append(k)
  elif fmt == "swin":
    prefix = "backbone." if any(k.startswith("backbone.patch_embed.") for k in state_dict) else ""
    for k, v in state_dict.items():
      if not k.startswith(prefix):
        skip(k, "outside the Swin backbone (another part of a detection model)")
        continue
      name = k[len(prefix):]
      if re.fullmatch(r"head\.(weight|bias)", name):
        skip(k, _CLASSIFIER)
      elif not prefix and re.fullmatch(r"norm\.(weight|bias)", name):
        skip(k, "classification LayerNorm after the last stage (the detector has its own output "
                "norms norm1..norm3)")
      elif re.fullmatch(r"layers\.\d+\.blocks\.\d+\.attn_mask", name):
        skip(k, "shift-window mask of the pre-training resolution (rebuilt for every input "
                "size)")
      else:
        out["backbone." + name] = (v, k)
  elif fmt == "detrex":
    for k, v in state_dict.items():
      if k.startswith("backbone."):
        out[k] = (v, k)
      else:
        skip(k, "not a backbone key (a backbone init loads only `backbone.*`; load the whole "
                "model with init.checkpoint)")
  else:
    raise ConversionError(f"unknown backbone format {fmt!r}; expected one of {BACKBONE_FORMATS}")
  return out, rows, unknown


def _resnet_depth_of(keys) -> Optional[int]:
  blocks = {int(m.group(1)) for k in keys for m in [re.match(r"backbone\.res4\.(\d+)\.", k)] if m}
  if not blocks:
    return None
  return {6: 50, 23: 101}.get(max(blocks) + 1)


def _swin_arch_of(keys_to_arrays) -> Dict[str, Any]:
  """What a Swin state dict says about its architecture (for error messages)."""
  info = {}
  w = keys_to_arrays.get("backbone.patch_embed.proj.weight")
  if w is not None:
    info["embed_dim"] = int(np.shape(w[0])[0])
  depths, heads = {}, {}
  for k, (v, _) in keys_to_arrays.items():
    m = re.match(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", k)
    if m:
      i, j = int(m.group(1)), int(m.group(2))
      depths[i] = max(depths.get(i, 0), j + 1)
      heads[i] = int(np.shape(v)[1])
      info["window_size"] = _window_of_table(np.shape(v)[0])
  if depths:
    info["depths"] = tuple(depths[i] for i in sorted(depths))
    info["num_heads"] = tuple(heads[i] for i in sorted(heads))
  return info


def _describe_backbone_config(bb) -> str:
  if bb["name"] == "swin":
    return (f"Swin embed_dim={bb['embed_dim']}, depths={tuple(bb['depths'])}, "
            f"num_heads={tuple(bb['num_heads'])}, window_size={bb['window_size']}")
  return f"ResNet-{bb['depth']} (base_width {bb.get('base_width', 64)}, norm {bb['norm']})"


def map_backbone(renamed, reference_flat, backbone_config, source: str = ""):
  """`rename_to_detrex`'s {detrex key: (array, source key)} -> ({target path: (array in our
  layout, source key)}, rows of every mapped or checked key and re-initialised variable).

  `reference_flat`: {path: leaf with a shape} of the whole model. Raises ConversionError naming
  each unexpected, mis-shaped and missing key.
  """
  bb = dict(backbone_config)
  swin = bb["name"] == "swin"
  targets = {p: tuple(np.shape(v)) for p, v in reference_flat.items() if p[1:2] == ("backbone",)}
  loaded, rows = {}, []
  unexpected, misshaped = [], []
  window = int(bb.get("window_size", 7))
  for key, (value, src) in renamed.items():
    if swin and key.endswith(".attn.relative_position_index"):
      problem = index_problem(key, value, window)
      if problem:
        misshaped.append(f"{src}: {problem}")
      else:
        rows.append(row("checked", source=src, shape=np.shape(value),
                        reason=f"constant: equals the formula for window {window}"))
      continue
    rule = swin_key_to_path(key) if swin else detrex_key_to_path(key)
    if rule is None:
      unexpected.append(src)
      continue
    collection, path, kind, leaf = rule
    target = (collection,) + tuple(path) + (leaf,)
    if target not in targets:
      unexpected.append(src)
      continue
    array = _transform(value, kind)
    if tuple(array.shape) != targets[target]:
      msg = f"{src}: {tuple(np.shape(value))}, model expects {targets[target]} ({kind} layout)"
      if swin:
        t = targets[target]
        want_torch = {"linear": t[::-1], "conv": (t[3], t[2], t[0], t[1]) if len(t) == 4 else t
                      }.get(kind, t)
        msg = f"{src}: " + _shape_problem(key, np.shape(value), want_torch, window)
      misshaped.append(msg)
      continue
    loaded[target] = (array, src)
    rows.append(row("mapped", source=src, target="/".join(target), shape=array.shape))
  missing = []
  for target in targets:
    if target in loaded:
      continue
    if swin and re.fullmatch(r"norm\d+", target[2]):
      rows.append(row("reinitialised", target="/".join(target), shape=targets[target],
                      reason="detector output norm of a Swin stage: not in an ImageNet checkpoint"))
    else:
      missing.append("/".join(target))
  problems = key_lines(40, ("backbone variables have no key in the file", missing, ", "),
                       ("unexpected keys", unexpected, ", "), ("mis-shaped keys", misshaped, "; "))
  if problems:
    lines = [f"{source}: the backbone weights do not fit the config's backbone "
             f"({_describe_backbone_config(bb)})"]
    if swin:
      arch = _swin_arch_of(renamed)
      if arch:
        lines.append("the file holds Swin " + ", ".join(f"{k}={v}" for k, v in arch.items()))
    else:
      depth = _resnet_depth_of(renamed)
      if depth and depth != bb["depth"]:
        lines.append(f"the file holds a ResNet-{depth}; set --config.model.backbone.depth={depth} "
                     "or use a ResNet-{} file".format(bb["depth"]))
    raise ConversionError("\n".join(lines + problems))
  return loaded, rows


def import_backbone(state_dict, fmt: str, reference_flat, backbone, meta=None,
                    source: str = ""):
  """An unwrapped backbone file of format `fmt` ("auto" or one of BACKBONE_FORMATS) -> (loaded
  {target path: (array, source key)}, rows, fmt), as `map_backbone`; `backbone`: the model's
  `BackboneConfig`."""
  bb = dataclasses.asdict(backbone)
  check_not_caffe2(state_dict, meta, source)
  detected = detect_format(state_dict)
  if fmt == "auto":
    if detected not in BACKBONE_FORMATS:
      raise ConversionError(f"{source}: cannot tell the key layout of this file (first keys: "
                            f"{list(state_dict)[:6]}); pass the format explicitly")
    fmt = detected
  if fmt not in BACKBONE_FORMATS:
    raise ConversionError(f"unknown backbone format {fmt!r}; expected one of {BACKBONE_FORMATS}")
  is_swin_file = fmt == "swin" or (fmt == "detrex" and detected == "detrex" and any(
      k.startswith("backbone.patch_embed.") for k in state_dict))
  if is_swin_file != (bb["name"] == "swin"):
    raise ConversionError(
        f"{source}: a {'Swin' if is_swin_file else 'ResNet'} backbone file, but the config "
        f"builds model.backbone.name={bb['name']!r}; use a matching config")
  if bb["name"] == "resnet" and bb["norm"] != "frozen_bn":
    raise ConversionError(
        f"{source}: ImageNet ResNet weights carry BatchNorm statistics, which load into "
        f"model.backbone.norm='frozen_bn' (detrex's setting), not {bb['norm']!r}")
  renamed, rows, unknown = rename_to_detrex(state_dict, fmt)
  if unknown:
    hint = (f" (this looks like a {detected} file: try --format {detected})"
            if detected not in (fmt, "unknown") else "")
    raise ConversionError(f"{source}: " + key_lines(
        40, (f"keys are not {fmt} backbone keys{hint}", unknown, ", "))[0])
  loaded, mapped_rows = map_backbone(renamed, reference_flat, bb, source)
  return loaded, rows + mapped_rows, fmt
