"""detrex Focus-DETR state_dict <-> our Flax variables (one name mapping, both directions).

Rules (spec §12): Linear weight (out, in) -> Dense kernel (in, out); Conv2d (O, I, kh, kw) ->
(kh, kw, I, O); LayerNorm/GroupNorm weight -> scale; FrozenBN buffers -> the `frozen` collection;
`in_proj_weight` [3D, D] -> `in_proj_kernel` [D, 3D]. Shared modules are saved by torch under
several names (aliases); we read the canonical name and check every alias holds the same array.
"""

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from focus_detr_jax.convert.swin import _window_of_table, index_problem
from focus_detr_jax.models.swin import relative_position_index

# Parameters that exist under several names in a detrex state_dict: {canonical: aliases}.
_NUM_DEC = 6


def alias_groups(num_decoder_layers=_NUM_DEC, num_encoder_layers=6) -> Dict[str, List[str]]:
  """Canonical detrex key prefix -> alias prefixes (state_dict order, first = canonical)."""
  groups = {}
  mcsp = [f"transformer.encoder.enhance_MCSP.{i}" for i in range(num_encoder_layers)]
  groups[mcsp[0]] = mcsp[1:] + [f"transformer.decoder.class_embed.{num_decoder_layers}",
                                f"class_embed.{num_decoder_layers}"] + [
                                    f"enhance_MCSP_layerlist.{i}" for i in range(num_encoder_layers)]
  for k in range(num_decoder_layers):
    groups[f"transformer.decoder.class_embed.{k}"] = [f"class_embed.{k}"]
  for k in range(num_decoder_layers + 1):
    groups[f"transformer.decoder.bbox_embed.{k}"] = [f"bbox_embed.{k}"]
  return groups


class ConversionError(ValueError):
  """A state_dict does not fit the model: names every missing, unexpected or mis-shaped key."""


def key_lines(limit, *groups):
  """`N <what>: k, k, ...` for each (what, keys, separator) group with keys, naming the first
  `limit` keys (then ` ...`)."""
  return [f"{len(keys)} {what}: " + sep.join(keys[:limit]) + (" ..." if len(keys) > limit else "")
          for what, keys, sep in groups if keys]


_BACKBONE_NORM = re.compile(r"^backbone\.(.+)\.norm\.(weight|bias|running_mean|running_var)$")


def detrex_key_to_path(key: str, num_decoder_layers=_NUM_DEC) -> Optional[Tuple[str, Tuple[str, ...], str]]:
  """Map one canonical detrex key to (collection, path, transform); None if not ours.

  transform: "linear" (transpose), "conv" (OIHW->HWIO), "copy".
  """
  if key.startswith("backbone.") and ".layers." not in key and not key.startswith(
      "backbone.patch_embed") and not re.match(r"backbone\.norm\d", key):
    # detectron2 ResNet.
    norm = _BACKBONE_NORM.match(key)
    m = norm or re.match(r"^backbone\.(.+)\.weight$", key)
    if not m:
      return None
    module = re.sub(r"^res(\d)\.(\d+)\.", r"res\1_\2/",
                    m.group(1).replace("stem.conv1", "stem_conv1"))
    if norm:
      return "frozen", ("backbone",) + tuple(f"{module}_norm".split("/")), "copy", m.group(2)
    return "params", ("backbone",) + tuple(module.split("/")), "conv", "kernel"
  m = re.match(r"^neck\.(convs|extra_convs)\.(\d+)\.(conv|norm)\.(weight|bias)$", key)
  if m:
    kind, i, part, leaf = m.groups()
    if part == "conv":
      return "params", ("neck", f"{kind}_{i}", "conv"), "conv" if leaf == "weight" else "copy", (
          "kernel" if leaf == "weight" else "bias")
    return "params", ("neck", f"{kind}_{i}", "norm"), "copy", "scale" if leaf == "weight" else "bias"
  simple = {"transformer.alpha": ("alpha",), "transformer.level_embeds": ("level_embeds",),
            "transformer.tgt_embed.weight": ("tgt_embed",), "label_enc.weight": ("label_enc",)}
  if key in simple:
    return "params", simple[key][:-1], "copy", simple[key][-1]
  key2 = key.replace("transformer.encoder.enhance_MCSP.0.", f"class_embed_{num_decoder_layers}.")
  key2 = re.sub(r"^transformer\.decoder\.(class_embed|bbox_embed)\.(\d+)\.", r"\1_\2.", key2)
  key2 = re.sub(r"^transformer\.encoder\.layers\.(\d+)\.", r"encoder_layers_\1.", key2)
  key2 = re.sub(r"^transformer\.decoder\.layers\.(\d+)\.", r"decoder_layers_\1.", key2)
  key2 = key2.replace("transformer.decoder.ref_point_head.", "ref_point_head.")
  key2 = key2.replace("transformer.decoder.norm.", "decoder_norm.")
  key2 = key2.replace("transformer.", "")
  parts = key2.split(".")
  leaf = parts[-1]
  module = ".".join(parts[:-1])
  module = module.replace("attentions.0.attn", "attentions_0").replace("attentions.1", "attentions_1")
  module = module.replace("ffns.0.layers.0.0", "ffns_0.layers_0_0").replace(
      "ffns.0.layers.1", "ffns_0.layers_1")
  module = re.sub(r"norms\.(\d)", r"norms_\1", module)
  module = re.sub(r"layers\.(\d)$", r"layers_\1", module)
  module = module.replace("enc_mask_predictor.layer1.0", "enc_mask_predictor.layer1_0").replace(
      "enc_mask_predictor.layer1.1", "enc_mask_predictor.layer1_1")
  module = re.sub(r"enc_mask_predictor\.layer2\.(\d)", r"enc_mask_predictor.layer2_\1", module)
  path = tuple(module.split("."))
  if leaf == "in_proj_weight":
    return "params", path, "linear", "in_proj_kernel"
  if leaf == "in_proj_bias":
    return "params", path, "copy", "in_proj_bias"
  is_norm = bool(re.search(r"(norms_\d|norm2|_norm|decoder_norm|layer1_0)$", module))
  if leaf == "weight":
    return "params", path, ("copy" if is_norm else "linear"), ("scale" if is_norm else "kernel")
  if leaf == "bias":
    return "params", path, "copy", "bias"
  return None


def _transform(array, kind, inverse=False):
  """torch layout -> ours ("linear": transpose, "conv": OIHW -> HWIO); `inverse`: ours -> torch."""
  if kind == "linear":
    return np.ascontiguousarray(np.asarray(array).T)
  if kind == "conv":
    return np.ascontiguousarray(np.transpose(np.asarray(array),
                                             (3, 2, 0, 1) if inverse else (2, 3, 1, 0)))
  return np.asarray(array)


def _alias_map(num_decoder_layers, num_encoder_layers):
  """alias key prefix -> canonical key prefix."""
  out = {}
  for canonical, aliases in alias_groups(num_decoder_layers, num_encoder_layers).items():
    for a in aliases:
      out[a + "."] = canonical + "."
  return out


def canonical_key(key, alias_map):
  for prefix, canonical in alias_map.items():
    if key.startswith(prefix):
      return canonical + key[len(prefix):]
  return key


def flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat) -> Dict[str, Any]:
  """{path tuple: leaf} -> nested dict."""
  out: Dict[str, Any] = {}
  for path, v in flat.items():
    node = out
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return out


def _rule(key, backbone_mapper, num_decoder_layers):
  """(collection, path, transform, leaf) of a canonical key: the backbone mapper's, else ours."""
  rule = backbone_mapper(key) if backbone_mapper and key.startswith("backbone.") else None
  return rule or detrex_key_to_path(key, num_decoder_layers)


def _swin_window(index_key, shapes, backbone_mapper) -> Optional[int]:
  """Window of the Swin block of a `relative_position_index` key, from the rows of its bias table
  in `shapes` ({(collection, *path, leaf): shape}); None if there is no such table."""
  rule = backbone_mapper(index_key.replace("_index", "_bias_table")) if backbone_mapper else None
  shape = rule and shapes.get((rule[0],) + tuple(rule[1]) + (rule[3],))
  return _window_of_table(shape[0]) if shape else None


def state_dict_to_variables(state_dict, reference_variables, num_decoder_layers=_NUM_DEC,
                            num_encoder_layers=6, backbone_mapper=None):
  """detrex state_dict -> (Flax variables shaped like `reference_variables`, {"mapped": [(key,
  path)]}).

  `backbone_mapper`: callable(key) -> (collection, path, transform, leaf) for backbone keys of
  another layout (Swin); default: detectron2 ResNet. Raises ConversionError naming every
  missing, unexpected and mis-shaped key and every alias that differs from its canonical key.
  """
  alias_map = _alias_map(num_decoder_layers, num_encoder_layers)
  expected = {tuple([c]) + path: np.shape(v) for c in reference_variables
              for path, v in flatten(reference_variables[c]).items()}
  out: Dict = {}
  mapped, unexpected, misshaped, alias_mismatch = [], [], [], []
  canonical_seen = {}
  for key in state_dict:
    if key.endswith("num_batches_tracked"):
      continue
    if key.endswith(".attn.relative_position_index"):
      # Swin constant, not a variable: it must equal the formula for the model's window.
      window = _swin_window(key, expected, backbone_mapper)
      problem = index_problem(key, state_dict[key], window) if window else None
      if window is None:
        unexpected.append(key)
      elif problem:
        misshaped.append(problem)
      continue
    canon = canonical_key(key, alias_map)
    if canon != key and canon in state_dict:
      if not np.array_equal(np.asarray(state_dict[canon]), np.asarray(state_dict[key])):
        alias_mismatch.append(f"{key} != {canon}")
      continue
    if canon in canonical_seen:
      continue
    rule = _rule(canon, backbone_mapper, num_decoder_layers)
    if rule is None:
      unexpected.append(key)
      continue
    collection, path, kind, leaf = rule
    full = (collection,) + tuple(path) + (leaf,)
    value = _transform(state_dict[key], kind)
    if full not in expected:
      unexpected.append(key)
      continue
    if tuple(value.shape) != tuple(expected[full]):
      misshaped.append(f"{key}: {tuple(np.shape(state_dict[key]))} -> {value.shape}, "
                       f"model expects {tuple(expected[full])}")
      continue
    canonical_seen[canon] = full
    out[full] = value
    mapped.append((key, "/".join(full)))
  got = set(canonical_seen.values())
  missing = sorted("/".join(p) for p in expected if p not in got)
  lines = key_lines(50, ("model variables have no key in the state_dict", missing, ", "),
                    ("unexpected keys", unexpected, ", "), ("mis-shaped keys", misshaped, "; "))
  if alias_mismatch:
    lines.append("aliases that differ from their canonical key: " + "; ".join(alias_mismatch))
  if lines:
    raise ConversionError("\n".join(lines))
  return unflatten(out), {"mapped": mapped}


def variables_to_state_dict(variables, key_order: Iterable[str], num_decoder_layers=_NUM_DEC,
                            num_encoder_layers=6, backbone_mapper=None):
  """Our variables -> a detrex state_dict with exactly the keys, in the order, of `key_order` (the
  detrex key list, aliases included, e.g. from a state_dict manifest)."""
  alias_map = _alias_map(num_decoder_layers, num_encoder_layers)
  flat = {(c,) + p: v for c in variables for p, v in flatten(variables[c]).items()}
  shapes = {p: np.shape(v) for p, v in flat.items()}
  out = {}
  for key in key_order:
    if key.endswith(".attn.relative_position_index"):
      window = _swin_window(key, shapes, backbone_mapper)
      if window is None:
        raise ConversionError(f"no Swin block of the variables holds detrex key {key}")
      out[key] = relative_position_index(window)
      continue
    canon = canonical_key(key, alias_map)
    rule = _rule(canon, backbone_mapper, num_decoder_layers)
    if rule is None:
      raise ConversionError(f"no variable maps to detrex key {key}")
    collection, path, kind, leaf = rule
    out[key] = _transform(flat[(collection,) + tuple(path) + (leaf,)], kind, inverse=True)
  return out
