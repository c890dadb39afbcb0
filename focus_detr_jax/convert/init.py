"""Start a model from other weights: a backbone file or a whole checkpoint (partial restore).

    init = InitConfig.from_config(config)                       # config.init, read once
    variables, report = apply_init(variables, init, FocusDETR.from_config(config.model))
    print(format_report(report))

A backbone file (`convert/backbones.py`) loads the backbone; the rest keeps its fresh init. A model
(one of our checkpoints, or a detrex state dict, `convert/detrex.py`) loads everything, except the
class heads and `label_enc`, re-initialised when the number of classes differs. Every input key is
loaded, checked or skipped with a reason, and every variable loaded or re-initialised with a reason;
anything else is a `ConversionError` that names it (docs/weights.md).
"""

import collections
import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.checkpoint import CONFIG_FILE, load_model_checkpoint
from focus_detr_jax.cli import UserError
from focus_detr_jax.convert import backbones, torch_io
from focus_detr_jax.convert.backbones import ConversionError, row
from focus_detr_jax.convert.detrex import (_alias_map, canonical_key, flatten, key_lines,
                                           state_dict_to_variables, unflatten)
from focus_detr_jax.convert.swin import backbone_mapper
from focus_detr_jax.models.focus_detr import INIT_IMAGE_SIZE, SKIP_COLLECTIONS, FocusDETR

_HEAD = re.compile(r"^params/(class_embed_\d+/(kernel|bias)|label_enc)$")


def is_class_head(path) -> bool:
  """True for the variables whose shape follows num_classes (re-initialised on a change)."""
  return bool(_HEAD.match(path if isinstance(path, str) else "/".join(path)))


def model_shapes(model: FocusDETR, image_size=INIT_IMAGE_SIZE):
  """{collection: tree of jax.ShapeDtypeStruct} of the model's variables (`params`, `frozen`)."""
  height, width = image_size
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, height, width), jnp.bool_))
  return {k: v for k, v in shapes.items() if k not in SKIP_COLLECTIONS}


def read_source(source, fmt: str = "auto"):
  """(state dict or None, our flat variables or None, metadata, rows, format) of a source path."""
  path = Path(source)
  if path.is_dir():
    if not (path / CONFIG_FILE).exists():
      raise ConversionError(f"{path} is a directory but not a model checkpoint (no config.json)")
    if fmt not in ("auto", "ours"):
      raise ConversionError(f"{path} is one of our model checkpoints, not format {fmt!r}")
    variables, cfg = load_model_checkpoint(path)
    flat = {p: np.asarray(v) for p, v in flatten(variables).items()}
    return None, flat, {"config": cfg}, [], "ours"
  obj = torch_io.load_file(path)
  state_dict, meta, rows = backbones.unwrap_state_dict(obj, str(path))
  return state_dict, None, meta, rows, fmt


def _num_classes_of(state_dict) -> Optional[int]:
  for key in ("transformer.decoder.class_embed.0.bias", "class_embed.0.bias", "label_enc.weight"):
    if key in state_dict:
      return int(np.shape(state_dict[key])[0])
  return None


def detrex_to_flat(state_dict, target_shapes, model: FocusDETR, source: str = ""):
  """A detrex state dict -> ({our path: (array, detrex key)}, rows, number of alias keys).

  The class heads are read at the checkpoint's own number of classes, so a checkpoint trained on
  other classes maps completely; `restore` then decides what to do with them.
  """
  num_dec, num_enc = model.num_decoder_layers, model.num_encoder_layers
  rows, sd = [], {}
  for k, v in state_dict.items():
    if k.endswith("num_batches_tracked"):
      rows.append(row("skipped", source=k, shape=np.shape(v),
                      reason="BatchNorm step counter, not a weight"))
    else:
      sd[k] = v
  n_src = _num_classes_of(sd)
  reference = {}
  for path, leaf in target_shapes.items():
    shape = tuple(np.shape(leaf))
    if n_src is not None and is_class_head(path):
      shape = (n_src, shape[1]) if path[-1] == "label_enc" else (
          (shape[0], n_src) if path[-1] == "kernel" else (n_src,))
    reference[path] = jax.ShapeDtypeStruct(shape, jnp.float32)
  try:
    variables, rep = state_dict_to_variables(sd, unflatten(reference), num_dec, num_enc,
                                             backbone_mapper=backbone_mapper(model))
  except ConversionError as e:
    raise ConversionError(
        f"{source}: the detrex state dict does not fit the config:\n{e}") from None
  by_path = {target: key for key, target in rep["mapped"]}
  flat = {p: (np.asarray(v), by_path["/".join(p)]) for p, v in flatten(variables).items()}
  alias_map = _alias_map(num_dec, num_enc)
  aliases = [k for k in sd
             if canonical_key(k, alias_map) != k and canonical_key(k, alias_map) in sd]
  for k in sd:
    if k.endswith(".attn.relative_position_index"):
      rows.append(row("checked", source=k, shape=np.shape(sd[k]),
                      reason="constant: equals the Swin formula"))
  return flat, rows, aliases


def restore(target, source_flat, kind: str, allowed_missing=None, source: str = "",
            num_classes=None, make_fresh=None):
  """Merge `source_flat` ({path: (array, source key)}) into `target` ({collection: tree}).

  A "backbone" merge loads only `backbone` variables; a "model" merge loads everything and
  re-initialises class heads of another num_classes. Re-initialised variables keep `target`'s
  values, or `make_fresh()`'s where `target` holds ShapeDtypeStructs. `allowed_missing`:
  {path: reason}; `num_classes`: (checkpoint, config). Returns (variables, loaded rows, skipped
  rows, re-initialised rows, notes).
  """
  allowed_missing = allowed_missing or {}
  target_flat = flatten(target)
  in_scope = (lambda p: p[1:2] == ("backbone",)) if kind == "backbone" else (lambda p: True)
  out, loaded, skipped, reinit = {}, [], [], []
  missing, unexpected, misshaped, casts = [], [], [], collections.Counter()
  for path, (value, key) in source_flat.items():
    if not in_scope(path):
      skipped.append(row("skipped", source=key, shape=np.shape(value), reason="not a backbone "
                         "variable (a backbone init loads only the backbone)"))
    elif path not in target_flat:
      unexpected.append(f"{key} -> {'/'.join(path)}")
  needs_values = []
  for path, leaf in target_flat.items():
    name = "/".join(path)
    want = tuple(np.shape(leaf))
    if not in_scope(path):
      reinit.append(row("reinitialised", target=name, shape=want,
                        reason="not in a backbone checkpoint: fresh init"))
      needs_values.append(path)
      continue
    if path not in source_flat:
      if path in allowed_missing:
        reinit.append(row("reinitialised", target=name, shape=want, reason=allowed_missing[path]))
        needs_values.append(path)
      else:
        missing.append(name)
      continue
    value, key = source_flat[path]
    if tuple(value.shape) != want:
      if kind == "model" and is_class_head(path):
        n_src, n_cfg = num_classes or ("?", "?")
        skipped.append(row("skipped", source=key, shape=value.shape,
                           reason=f"class head for {n_src} classes; the config has {n_cfg}"))
        reinit.append(row("reinitialised", target=name, shape=want,
                          reason=f"num_classes {n_src} -> {n_cfg}: fresh init"))
        needs_values.append(path)
      else:
        misshaped.append(f"{key}: {tuple(value.shape)} (as {name}), model expects {want}")
      continue
    dtype = np.dtype(getattr(leaf, "dtype", np.float32))
    if value.dtype != dtype:
      casts[f"{value.dtype}->{dtype}"] += 1
      value = value.astype(dtype)
    out[path] = value
    loaded.append(row("mapped", source=key, target=name, shape=want))
  order = {key: i for i, (_, key) in enumerate(source_flat.values())}
  loaded.sort(key=lambda r: order[r["source"]])
  problems = key_lines(40, ("model variables are not in the checkpoint", missing, ", "),
                       ("checkpoint entries have no model variable", unexpected, ", "),
                       ("mis-shaped entries", misshaped, "; "))
  if problems:
    raise ConversionError("\n".join([f"{source}: the checkpoint does not fit the config"]
                                     + problems))
  no_values = [p for p in needs_values if isinstance(target_flat[p], jax.ShapeDtypeStruct)]
  if no_values and make_fresh is not None:
    fresh = flatten({c: v for c, v in make_fresh().items() if c not in SKIP_COLLECTIONS})
    target_flat = dict(target_flat)
    for p in no_values:
      if tuple(np.shape(fresh[p])) != tuple(np.shape(target_flat[p])):
        raise ConversionError(f"fresh init of {'/'.join(p)} has shape {np.shape(fresh[p])}, "
                              f"expected {np.shape(target_flat[p])}")
      target_flat[p] = fresh[p]
    no_values = []
  if no_values:
    hint = ""
    if num_classes and num_classes[0] != num_classes[1]:
      hint = (f"; the checkpoint has {num_classes[0]} classes and the config {num_classes[1]}: "
              f"convert with --config.model.num_classes={num_classes[0]}, or fine-tune on other "
              "classes with --config.init.checkpoint=PATH (the class heads are re-initialised)")
    raise ConversionError(f"{source}: {len(no_values)} model variables would need a fresh init, "
                          "which this exact conversion does not do: "
                          + ", ".join("/".join(p) for p in no_values[:20]) + hint)
  for path in needs_values:
    out[path] = np.asarray(target_flat[path])
  notes = [f"cast {n} arrays {what}" for what, n in casts.items()]
  return unflatten(out), loaded, skipped, reinit, notes


def init_from_checkpoint(variables, source, model: FocusDETR, *, kind: str = "auto",
                         format: str = "auto") -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Load `source` (a backbone file, a detrex state dict, one of our checkpoints) into `variables`.

  `variables`: {collection: tree} of `model`, whose values are kept where the source has
  nothing; ShapeDtypeStructs when nothing needs a fresh init; or a zero-argument callable giving
  them, called only once the source has been read and checked, so that a refused file fails fast.
  `kind`: "backbone", "model" or "auto"; `format`: "auto", "ours", "detrex", "torchvision",
  "detectron2", "swin". Returns (numpy variables, report: `loaded`, `skipped` and `reinitialised`
  rows with reasons, `num_source_keys` / `num_mapped` for the `mapped N/M keys` line).
  """
  source = str(source)
  make_fresh = None
  if callable(variables):
    make_fresh, variables = variables, model_shapes(model)
  variables = {c: variables[c] for c in variables if c not in SKIP_COLLECTIONS}
  target_shapes = flatten(variables)
  state_dict, ours_flat, meta, rows, fmt = read_source(source, format)
  if kind == "auto":
    if ours_flat is not None:
      kind = "model"
    else:
      detected = backbones.detect_format(state_dict) if fmt == "auto" else fmt
      kind = "model" if detected == "detrex" else "backbone"
  if kind not in ("backbone", "model"):
    raise ValueError(f"kind must be 'backbone', 'model' or 'auto', not {kind!r}")
  notes = []
  if meta.get("stripped_prefix"):
    notes.append(f"stripped the prefix {meta['stripped_prefix']!r} from every key")
  allowed_missing, aliases, num_classes = {}, [], None
  n_cfg = model.num_classes
  if ours_flat is not None:
    fmt = "ours"
    source_flat = {p: (v, "/".join(p)) for p, v in ours_flat.items()}
    src_cfg = meta["config"]
    num_classes = (int(src_cfg.model.num_classes) if "model" in src_cfg else "?", n_cfg)
    num_source_keys = len(source_flat)
  elif kind == "backbone":
    source_flat, brows, fmt = backbones.import_backbone(state_dict, fmt, target_shapes,
                                                        model.backbone, meta, source)
    rows += [r for r in brows if r["status"] in ("skipped", "checked")]
    allowed_missing = {tuple(r["target"].split("/")): r["reason"] for r in brows
                       if r["status"] == "reinitialised"}
    num_source_keys = len(state_dict)
  else:
    backbones.check_not_caffe2(state_dict, meta, source)
    if fmt not in ("auto", "detrex"):
      raise ConversionError(f"{source}: format {fmt!r} holds backbone weights; load it with "
                            "kind='backbone' (init.backbone), or use format 'detrex'")
    fmt = "detrex"
    source_flat, drows, aliases = detrex_to_flat(state_dict, target_shapes, model, source)
    rows += drows
    num_classes = (_num_classes_of(state_dict), n_cfg)
    num_source_keys = len(state_dict) - len(aliases)
    if aliases:
      notes.append(f"{len(aliases)} alias keys (shared modules that torch saves under several "
                   "names) checked equal to their canonical key and counted once")
  merged, loaded_rows, skipped_rows, reinit_rows, cast_notes = restore(
      variables, source_flat, kind, allowed_missing, source, num_classes, make_fresh)
  checked = [r for r in rows if r["status"] == "checked"]
  skipped = [r for r in rows if r["status"] == "skipped"] + skipped_rows
  report = {
      "source": source, "kind": kind, "format": fmt,
      "loaded": loaded_rows + checked, "skipped": skipped, "reinitialised": reinit_rows,
      "notes": notes + cast_notes,
      "num_source_keys": num_source_keys,
      "num_mapped": len({r["source"] for r in loaded_rows}) + len(checked),
  }
  return merged, report


# ImageNet backbone files named by the COCO configs (detrex's `train.init_checkpoint` names), and
# where to get each. "none" (`--config.init.backbone=none`) trains from a random backbone.
NO_BACKBONE = "none"
_D2 = "https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/torchvision/"
_SWIN = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
BACKBONE_SOURCES = {
    "r50_v1.pkl": (
        f"torchvision's ImageNet ResNet-50 in detectron2 format: download {_D2}R-50.pkl (the "
        "same weights) and save it under this name, or convert torchvision's resnet50 .pth with "
        "detectron2's tools/convert-torchvision-to-d2.py; a torchvision .pth is also read as is"),
    "r101_v1.pkl": (
        "torchvision's ImageNet ResNet-101 (resnet101-63fe2227.pth from download.pytorch.org) "
        "converted with detectron2's tools/convert-torchvision-to-d2.py; the .pth is also read "
        "as is"),
    "swin_tiny_patch4_window7_224.pth": f"download {_SWIN}swin_tiny_patch4_window7_224.pth",
    "swin_base_patch4_window12_384_22k.pth": (
        f"download {_SWIN}swin_base_patch4_window12_384_22k.pth"),
    "swin_large_patch4_window12_384_22k.pth": (
        f"download {_SWIN}swin_large_patch4_window12_384_22k.pth"),
}


class BackboneFileError(UserError, ValueError):
  """The config names no usable ImageNet backbone file (and does not say `none`)."""


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """`config.init` read once: where a new run's weights come from. Empty paths: a fresh init;
  formats "auto": detected from the file."""
  backbone: str = ""             # an ImageNet backbone file, or "none": a random backbone
  backbone_format: str = "auto"
  checkpoint: str = ""           # a whole model: one of ours, or a detrex state dict
  checkpoint_format: str = "auto"

  @classmethod
  def from_config(cls, config) -> "InitConfig":
    init = config.get("init") or {}
    return cls(**{f.name: str(init.get(f.name) or f.default) for f in dataclasses.fields(cls)})

  @property
  def backbone_file(self) -> str:
    """The backbone path, or "" when it is empty or `none`."""
    return "" if self.backbone.strip().lower() == NO_BACKBONE else self.backbone


def check_backbone_file(init: InitConfig) -> None:
  """Raises `BackboneFileError` (where to get the file) unless `init` names a model checkpoint,
  an existing backbone file, or says `none` explicitly."""
  value = init.backbone
  if init.checkpoint or (value and not init.backbone_file):   # a model checkpoint, or `none`
    return
  off = ("to train from a randomly initialised backbone instead, pass "
         "--config.init.backbone=none")
  if not value:
    raise BackboneFileError(
        "config.init.backbone is empty: name the ImageNet backbone file (detrex's configs use "
        f"{', '.join(BACKBONE_SOURCES)}; docs/weights.md lists the formats), or {off}")
  if not Path(value).exists() and "://" not in value:
    name = Path(value).name
    how = BACKBONE_SOURCES.get(name, "any torchvision, detectron2 or official Swin file of "
                                     "this backbone (docs/weights.md)")
    raise BackboneFileError(
        f"config.init.backbone={value} does not exist. Get it: {how}; put it at {value} (or "
        f"pass --config.init.backbone=PATH). It is read as is (no separate conversion step; "
        f"`scripts/convert_checkpoint.py --config CONFIG FILE OUT` converts it to a model "
        f"checkpoint once, for --config.init.checkpoint=OUT). Or {off}")


def apply_init(variables, init: InitConfig, model: FocusDETR):
  """Load `init`'s backbone file or model checkpoint (nothing when both are empty) into fresh
  `variables` of `model`. Returns (variables, report or None); the trainer calls this once
  after its own init."""
  if init.backbone_file and init.checkpoint:
    raise ValueError("set only one of config.init.backbone and config.init.checkpoint: a model "
                     "checkpoint already holds a backbone")
  if init.checkpoint:
    return init_from_checkpoint(variables, init.checkpoint, model, kind="model",
                                format=init.checkpoint_format)
  if init.backbone_file:
    return init_from_checkpoint(variables, init.backbone_file, model, kind="backbone",
                                format=init.backbone_format)
  return variables, None


def _shape(r):
  return "x".join(map(str, r["shape"])) if r.get("shape") is not None else ""


def format_report(report, verbose: bool = False) -> str:
  """The printed table: mapped, checked, skipped and re-initialised (by module unless `verbose`)
  rows, notes, and last `mapped N/M keys`."""
  lines = [f"source: {report['source']}  (format {report['format']}, {report['kind']} weights)"]
  loaded = [r for r in report["loaded"] if r["status"] == "mapped"]
  checked = [r for r in report["loaded"] if r["status"] == "checked"]
  if loaded:
    width = min(max(len(r["source"]) for r in loaded), 70)
    lines.append(f"mapped ({len(loaded)}):")
    lines += [f"  {r['source']:<{width}}  -> {r['target']}  [{_shape(r)}]" for r in loaded]
  if checked:
    lines.append(f"checked, not variables ({len(checked)}):")
    lines += [f"  {r['source']}  [{_shape(r)}]  {r['reason']}" for r in checked]
  if report["skipped"]:
    lines.append(f"skipped ({len(report['skipped'])}):")
    lines += [f"  {r['source']}  [{_shape(r)}]  {r['reason']}" for r in report["skipped"]]
  reinit = report["reinitialised"]
  if reinit:
    lines.append(f"re-initialised ({len(reinit)} arrays):")
    if verbose:
      lines += [f"  {r['target']}  [{_shape(r)}]  {r['reason']}" for r in reinit]
    else:
      groups = collections.Counter(("/".join(r["target"].split("/")[:2]), r["reason"])
                                   for r in reinit)
      lines += [f"  {m}  ({n} array{'s' if n > 1 else ''})  {why}"
                for (m, why), n in groups.items()]
  lines += [f"note: {note}" for note in report.get("notes", [])]
  lines.append(f"mapped {report['num_mapped']}/{report['num_source_keys']} keys")
  return "\n".join(lines)
