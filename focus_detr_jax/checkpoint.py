"""Model checkpoints: variables (`params`, `frozen`) + the config that built them.

A model checkpoint directory holds `variables/` (orbax StandardCheckpointer) and `config.json`.
Converters write it, training exports it, predict/evaluate/fine-tuning read it. Training state
checkpoints (optimiser, step, RNG, input position) live in the training workdir instead
(train/checkpointing.py) and can be turned into a model checkpoint.
"""

import json
import os
from typing import Any, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

VARIABLES_DIR = "variables"
CONFIG_FILE = "config.json"
REPORT_FILE = "conversion_report.json"


def as_path(path) -> epath.Path:
  """A local path (made absolute) or a URL (`gs://...`) as an `epath.Path` (orbax, tf.io.gfile)."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(path))


def save_model_checkpoint(directory, variables: Dict[str, Any], config: ml_collections.ConfigDict,
                          report: Optional[Dict[str, Any]] = None):
  """Write variables + config (+ an optional JSON report) to `directory` (created)."""
  directory = as_path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  # Arrays spread over several hosts stay global jax.Arrays (orbax writes them collectively;
  # every process must call this then); everything else is saved from host memory.
  tree = jax.tree_util.tree_map(
      lambda x: x if isinstance(x, jax.Array) and not x.is_fully_addressable else np.asarray(x),
      dict(variables))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / VARIABLES_DIR, tree, force=True)
  if jax.process_index() == 0:
    (directory / CONFIG_FILE).write_text(config.to_json_best_effort(indent=1))
    if report is not None:
      (directory / REPORT_FILE).write_text(json.dumps(report, indent=1, default=str))
  return directory


def load_config(directory) -> ml_collections.ConfigDict:
  """The config saved beside a model checkpoint (or in a training workdir).

  Keys added to the code since the file was written take their defaults
  (`configs/common.py`, when importable), so older checkpoints keep loading.
  """
  path = as_path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{directory} is not a model checkpoint: {CONFIG_FILE} is missing")
  try:
    stored = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  return ml_collections.ConfigDict(_with_defaults(stored, _base_config()))


def _base_config() -> Dict[str, Any]:
  try:
    from configs import common
  except ImportError:   # the package without the repository's configs/
    return {}
  return common.get_base_config().to_dict()


def _with_defaults(stored: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
  """`stored`, plus the keys of `defaults` it lacks (recursively)."""
  out = dict(stored)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _with_defaults(out[key], value)
  return out


def load_model_checkpoint(directory) -> Tuple[Dict[str, Any], ml_collections.ConfigDict]:
  """(variables, config) of a model checkpoint directory (numpy arrays on the host)."""
  directory = as_path(directory)
  config = load_config(directory)
  if not (directory / VARIABLES_DIR).exists():
    raise FileNotFoundError(f"{directory} is not a model checkpoint: {VARIABLES_DIR}/ is missing")
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(directory / VARIABLES_DIR)
  return variables, config
