"""detectron2 / detrex Swin state_dict keys <-> `models.swin.SwinTransformer` param paths.

Keys (prefix `backbone.`) keep their module names, with `layers.{i}.blocks.{j}` -> `layers_{i}/
blocks_{j}`; Linear weights are transposed, the patch embedding conv goes OIHW -> HWIO, norm
weights become `scale`. `attn.relative_position_index` is no variable (a constant of the model):
`index_problem` checks it against the formula for the model's window. `swin_key_to_path` is the
Swin rule of the one name mapping (the `backbone_mapper` of `convert/detrex.py` and of
`convert/backbones.py`); `swin_key_table` lists a configuration's keys in state_dict order.
"""

import math
import re
from typing import Dict, Optional, Tuple

import numpy as np

from focus_detr_jax.models.swin import relative_position_index

# torch leaf -> (our leaf, transform) per module kind.
_LINEAR = {"weight": ("kernel", "linear"), "bias": ("bias", "copy")}
_NORM = {"weight": ("scale", "copy"), "bias": ("bias", "copy")}
_CONV = {"weight": ("kernel", "conv"), "bias": ("bias", "copy")}
_INDEX_LEAF = "relative_position_index"


def swin_key_table(model, prefix: str = "backbone.") -> Dict[str, Tuple[Optional[Tuple[str, ...]],
                                                                         str, Tuple[int, ...]]]:
  """{torch key: (our param path or None for the index buffer, transform, torch shape)} of every
  detectron2 state_dict key of this configuration, in state_dict order; transform: "linear",
  "conv", "copy" or "index" (the int64 buffer)."""
  c0, w, p = int(model.embed_dim), int(model.window_size), int(getattr(model, "patch_size", 4))
  depths, heads = tuple(int(d) for d in model.depths), tuple(int(h) for h in model.num_heads)
  table = {}

  def add(module_key, module_path, leaves, shapes):
    for leaf, shape in zip(("weight", "bias"), shapes):
      if shape is None:
        continue
      ours, kind = leaves[leaf]
      table[f"{prefix}{module_key}.{leaf}"] = (module_path + (ours,), kind, tuple(shape))

  add("patch_embed.proj", ("patch_embed", "proj"), _CONV, [(c0, 3, p, p), (c0,)])
  add("patch_embed.norm", ("patch_embed", "norm"), _NORM, [(c0,), (c0,)])
  for i, (depth, h) in enumerate(zip(depths, heads)):
    c = c0 * 2 ** i
    hidden = int(c * float(model.mlp_ratio))
    for j in range(depth):
      tk, tp = f"layers.{i}.blocks.{j}", (f"layers_{i}", f"blocks_{j}")
      add(f"{tk}.norm1", tp + ("norm1",), _NORM, [(c,), (c,)])
      table[f"{prefix}{tk}.attn.relative_position_bias_table"] = (
          tp + ("attn", "relative_position_bias_table"), "copy", ((2 * w - 1) ** 2, h))
      table[f"{prefix}{tk}.attn.{_INDEX_LEAF}"] = (None, "index", (w * w, w * w))
      add(f"{tk}.attn.qkv", tp + ("attn", "qkv"), _LINEAR, [(3 * c, c), (3 * c,)])
      add(f"{tk}.attn.proj", tp + ("attn", "proj"), _LINEAR, [(c, c), (c,)])
      add(f"{tk}.norm2", tp + ("norm2",), _NORM, [(c,), (c,)])
      add(f"{tk}.mlp.fc1", tp + ("mlp", "fc1"), _LINEAR, [(hidden, c), (hidden,)])
      add(f"{tk}.mlp.fc2", tp + ("mlp", "fc2"), _LINEAR, [(c, hidden), (c,)])
    if i < len(depths) - 1:
      add(f"layers.{i}.downsample.reduction", (f"layers_{i}", "downsample", "reduction"), _LINEAR,
          [(2 * c, 4 * c), None])
      add(f"layers.{i}.downsample.norm", (f"layers_{i}", "downsample", "norm"), _NORM,
          [(4 * c,), (4 * c,)])
  for k in map(int, model.out_indices):
    c = c0 * 2 ** k
    add(f"norm{k}", (f"norm{k}",), _NORM, [(c,), (c,)])
  return table


def backbone_mapper(model):
  """The detrex-key rule of `model`'s backbone (None: the ResNet rules of convert/detrex)."""
  return swin_key_to_path if model.backbone.name == "swin" else None


def swin_key_to_path(key: str, prefix: str = "backbone.", scope: Tuple[str, ...] = ("backbone",)):
  """One torch key -> ("params", scope + path, transform, leaf), by name only; None if not a Swin
  parameter (including the `relative_position_index` buffer, which is no variable)."""
  if not key.startswith(prefix):
    return None
  rest = key[len(prefix):]
  m = re.fullmatch(r"patch_embed\.(proj|norm)\.(weight|bias)", rest)
  if m:
    leaves = _CONV if m.group(1) == "proj" else _NORM
    ours, kind = leaves[m.group(2)]
    return "params", scope + ("patch_embed", m.group(1)), kind, ours
  m = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", rest)
  if m:
    i, j, tail = m.groups()
    base = scope + (f"layers_{i}", f"blocks_{j}")
    if tail == "attn.relative_position_bias_table":
      return "params", base + ("attn",), "copy", "relative_position_bias_table"
    m2 = re.fullmatch(r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", tail)
    if m2:
      leaves = _NORM if m2.group(1).startswith("norm") else _LINEAR
      ours, kind = leaves[m2.group(2)]
      return "params", base + tuple(m2.group(1).split(".")), kind, ours
    return None
  m = re.fullmatch(r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", rest)
  if m:
    module, leaf = m.group(2).split(".")
    ours, kind = (_LINEAR if module == "reduction" else _NORM)[leaf]
    return "params", scope + (f"layers_{m.group(1)}", "downsample", module), kind, ours
  m = re.fullmatch(r"(norm\d+)\.(weight|bias)", rest)
  if m:
    ours, kind = _NORM[m.group(2)]
    return "params", scope + (m.group(1),), kind, ours
  return None


def _window_of_table(rows):
  """Window size whose bias table has `rows` rows ((2w-1)^2), or None."""
  r = math.isqrt(int(rows))
  return (r + 1) // 2 if r * r == rows and r % 2 == 1 else None


def _shape_problem(key, got, want, window):
  msg = f"{key}: shape {tuple(got)}, expected {tuple(want)}"
  if key.endswith("relative_position_bias_table") and len(got) == 2:
    implied = _window_of_table(got[0])
    msg += (f" for window_size={window} ((2w-1)^2 = {(2 * window - 1) ** 2} rows, heads = "
            f"{want[1]}); {got[0]} rows " +
            (f"is window {implied}" if implied else "fits no window size"))
  elif key.endswith(_INDEX_LEAF) and len(got) == 2:
    r = math.isqrt(int(got[0]))
    msg += f" for window_size={window}; [{got[0]}, {got[1]}] " + (
        f"is window {r}" if r * r == got[0] else "fits no window size")
  return msg


def index_problem(key: str, value, window: int) -> Optional[str]:
  """What is wrong with the `relative_position_index` buffer `key` for `window`, or None."""
  want = relative_position_index(window)
  if tuple(np.shape(value)) != want.shape:
    return _shape_problem(key, np.shape(value), want.shape, window)
  if not np.array_equal(np.asarray(value), want):
    return (f"{key}: relative_position_index differs from the formula (dy+w-1)*(2w-1)+(dx+w-1) "
            f"for window_size={window}")
  return None
