"""Model checkpoints: variables (`params`, `frozen`) + the config that built them; and the
variables of a training workdir's newest restorable step, read without anything of training.

A model checkpoint directory holds `variables/` (orbax StandardCheckpointer) and `config.json`.
Converters write it, training exports it, predict/evaluate/fine-tuning read it. Training state
checkpoints (optimiser, step, RNG, input position) live in the training workdir instead
(train/checkpointing.py writes and resumes them); `load_workdir_variables` reads only their
parameters.
"""

import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from focus_detr_jax.cli import UserError, one_line

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


class CheckpointError(UserError):
  """No checkpoint of a workdir can be restored."""


def root_cause(error: BaseException, limit: int = 300) -> str:
  """The innermost exception's message on one line (orbax wraps tensorstore's in long specs)."""
  seen = [error]
  while (seen[-1].__cause__ or seen[-1].__context__) is not None and len(seen) < 20:
    seen.append(seen[-1].__cause__ or seen[-1].__context__)
  message = one_line(seen[-1])
  return message if len(message) <= limit else message[:limit] + "..."


def load_workdir_variables(workdir) -> Tuple[Dict[str, Any], int]:
  """(variables, step) of the newest training checkpoint of `workdir` that restores.

  Reads only the parameters (the EMA ones when the run keeps them) and the other variable
  collections, at their stored shapes: nothing of the optimiser or of training is needed. Steps
  that do not restore are skipped with a warning (and left on disk); none restorable raises
  `CheckpointError`, no checkpoint at all `FileNotFoundError`.
  """
  root = as_path(workdir) / "checkpoints"
  steps = sorted((int(d.name) for d in root.iterdir() if d.name.isdigit()),
                 reverse=True) if root.exists() else []
  if not steps:
    raise FileNotFoundError(f"no training checkpoint in {workdir}/checkpoints")
  return restore_newest(root, steps,
                        lambda s: (_restore_variables(root / str(s) / "state"), s))[0]


def restore_newest(root, steps, restore_step, keep_raising=()):
  """(restore_step(s), skipped) for the first step of `steps` (newest first) that restores.

  A step whose restore raises is skipped with a warning and left on disk; `skipped` lists the
  (step, reason) pairs. Exceptions of the types `keep_raising` propagate (a config problem is
  the same for every step); none restorable raises `CheckpointError`.
  """
  skipped: List[Tuple[int, str]] = []
  for step in steps:
    try:
      restored = restore_step(step)
    except keep_raising:
      raise
    except Exception as e:  # pylint: disable=broad-except  # any unreadable step is skipped
      reason = root_cause(e)
      logging.warning("checkpoint %s cannot be restored, skipped (left on disk): %s",
                      as_path(root) / str(step), reason)
      skipped.append((step, reason))
      continue
    if skipped:
      logging.warning("restored step %d instead of the newest checkpoint (skipped: %s)", step,
                      ", ".join(str(k) for k, _ in skipped))
    return restored, skipped
  raise CheckpointError(f"no checkpoint in {root} can be restored: " +
                        "; ".join(f"step {k}: {why}" for k, why in skipped))


def _restore_variables(state_dir) -> Dict[str, Any]:
  stored = ocp.StandardCheckpointHandler().metadata(state_dir).tree
  params = "ema_params" if stored.get("ema_params") is not None else "params"
  wanted = {params: stored[params], "extra": stored.get("extra") or {}}
  abstract = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), wanted,
                                    is_leaf=lambda m: hasattr(m, "shape"))
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True))
  return {"params": restored[params], **(restored.get("extra") or {})}
