"""Deterministic reference weights, rebuilt from a `state_dict_manifest.json` (parity/README §4).

The recorded reference sets overwrite every float entry of the detrex state_dict with a value drawn
from `default_rng(crc32(key) + seed)` by a per-key rule; aliases (shared modules saved under several
paths) point at their canonical key. This rebuilds that state_dict bitwise in numpy.
"""

import hashlib
import json
import os
import zlib
from pathlib import Path

import numpy as np

# The float rules: rng, shape -> values (parity/README §4).
_FLOAT_RULES = {
    "running_var": lambda rng, s: rng.uniform(0.5, 1.5, s),
    "running_mean": lambda rng, s: rng.normal(0, 0.1, s),
    "norm_weight": lambda rng, s: 1 + rng.normal(0, 0.1, s),
    "vec": lambda rng, s: rng.normal(0, 0.02, s),
    "embedding": lambda rng, s: rng.normal(0, 1, s),
    "fan_in": lambda rng, s: rng.normal(0, 1, s) * np.sqrt(1.0 / int(np.prod(s[1:]))),
}


def rule_value(key, shape, rule, seed):
  """The value of one canonical key under the recording's weight rule."""
  s = tuple(shape)
  if rule == "int_buffer":
    window = int(round(np.sqrt(s[0])))
    if s != (window * window, window * window):
      raise ValueError(f"int_buffer rule only covers Swin relative_position_index, got {key} {s}")
    # pylint: disable=import-outside-toplevel
    # Imported here: the recorder imports this module in the torch environment, without flax.
    from focus_detr_jax.models.swin import relative_position_index
    return relative_position_index(window).astype(np.int64)
  if rule not in _FLOAT_RULES:
    raise ValueError(f"unknown weight rule {rule!r} for key {key}")
  rng = np.random.default_rng(zlib.crc32(key.encode()) + seed)
  return _FLOAT_RULES[rule](rng, s).astype(np.float32)


def load_manifest(path):
  """[(key, shape, dtype, rule, alias_of)] in state_dict order."""
  with open(path) as f:
    return [tuple(row) for row in json.load(f)]


def checkpoint_path(set_dir):
  """The weight file of a set recorded from a checkpoint (manifest rule "checkpoint").

  meta.json's `weights` names the file and its sha256 (scripts/record_reference.py
  --checkpoint); the file is looked up in FOCUS_DETR_REFERENCE_CHECKPOINT, then next to the set.
  """
  set_dir = Path(set_dir)
  info = json.loads((set_dir / "meta.json").read_text())["weights"]
  candidates = [os.environ.get("FOCUS_DETR_REFERENCE_CHECKPOINT"), set_dir / info["file"]]
  path = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
  if path is None:
    raise FileNotFoundError(f"{set_dir} was recorded from the checkpoint {info['file']} "
                            f"(sha256 {info['sha256']}); put it next to the set or point "
                            "FOCUS_DETR_REFERENCE_CHECKPOINT at it")
  digest = sha256(path)
  if digest != info["sha256"]:
    raise ValueError(f"{path}: sha256 {digest} differs from the recorded {info['sha256']}")
  return path


def sha256(path):
  digest = hashlib.sha256()   # read in chunks: hashlib.file_digest needs Python 3.11
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def build_state_dict(manifest_path, seed, prefix=""):
  """Rebuild the recorded state_dict: {key: np.ndarray}; aliases share the canonical array, rows
  with rule "checkpoint" take their value from the set's checkpoint file (checkpoint_path)."""
  state_dict = {}
  checkpoint = None
  for key, shape, _, rule, alias_of in load_manifest(manifest_path):
    if alias_of is not None:
      state_dict[key] = state_dict[alias_of]
    elif rule == "checkpoint":
      if checkpoint is None:
        # pylint: disable=import-outside-toplevel
        from focus_detr_jax.convert import torch_io   # here: as relative_position_index above
        obj = torch_io.load_file(checkpoint_path(Path(manifest_path).parent))
        checkpoint = obj.get("model", obj) if isinstance(obj, dict) else obj
      state_dict[key] = np.asarray(checkpoint[key]).reshape(shape)
    else:
      state_dict[key] = rule_value(prefix + key, shape, rule, seed)
  return state_dict
