"""Checks of a run's config before anything is created, read or compiled.

* `check_batch_sizes`: the global batch splits over processes, devices and batch groups.
* `check_against_checkpoint`: a workdir (or model checkpoint) keeps the `config.json` of the model
  it holds; resuming or predicting with a model config that builds other shapes fails here,
  naming each differing key, instead of deep inside the checkpoint restore.
* `describe_shape_mismatch`: the message for parameters whose stored shape differs anyway.
"""

import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from focus_detr_jax.checkpoint import CONFIG_FILE, as_path
from focus_detr_jax.cli import UserError
from focus_detr_jax.convert import init as init_lib

# Model keys that change neither the parameters nor the optimiser state: free to differ from the
# checkpoint's config (compute dtype, inference and denoising-noise settings).
FREE_MODEL_KEYS = frozenset({"dtype", "remat", "num_select", "eval_padding_mask",
                             "label_noise_ratio", "box_noise_scale", "backbone.drop_path_rate"})
# Model keys whose value shows up in parameter shapes, to name in a shape mismatch.
SHAPE_KEYS = ("num_classes", "hidden_dim", "ffn_dim", "num_queries", "num_heads", "num_levels",
              "num_points", "dn_number", "backbone.base_width", "backbone.embed_dim")


class ConfigMismatchError(UserError):
  """The run's model config does not build the model stored in a checkpoint."""


def check_batch_sizes(config, num_devices: int, num_processes: int = 1) -> None:
  """`data.batch_size` splits evenly over processes, devices and `model.batch_group_size`."""
  batch, group = int(config.data.batch_size), int(config.model.batch_group_size)
  if batch <= 0 or group <= 0:
    raise UserError(f"config.data.batch_size={batch} and config.model.batch_group_size={group} "
                    f"must be positive")
  if batch % num_processes:
    raise UserError(f"config.data.batch_size={batch} does not split over {num_processes} "
                    f"processes")
  if batch % num_devices:
    raise UserError(f"config.data.batch_size={batch} does not split over the {num_devices} "
                    f"devices (use a multiple of {num_devices * group}: "
                    f"devices x model.batch_group_size)")
  if (batch // num_devices) % group:
    raise UserError(f"config.data.batch_size={batch} gives {batch // num_devices} images per "
                    f"device, not a multiple of config.model.batch_group_size={group} (groups "
                    f"must not span devices; use a multiple of {num_devices * group})")


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; tuples become lists (as in JSON)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = json.loads(json.dumps(value, default=str))
  return out


def stored_model_config(directory) -> Optional[Dict[str, Any]]:
  """The `model` section of `directory/config.json`, or None without a readable one."""
  path = as_path(directory) / CONFIG_FILE
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text()).get("model")
  except (ValueError, OSError) as e:
    logging.warning("%s cannot be read (%s): the config is not compared with it (parameter "
                    "shapes are still checked when a checkpoint is restored)", path, e)
    return None


def check_against_checkpoint(config, directory, what: str, training: bool = False) -> None:
  """Fail when `config.model` builds other shapes than the model saved in `directory`.

  `what` names the directory in the message ("workdir", "checkpoint"); `training` picks the
  advice (resume with the saved settings, or start another workdir from this model).
  """
  stored = stored_model_config(directory)
  if stored is None:
    return
  # Only keys present in both are compared (a key added to the code since the checkpoint was
  # written has no stored value to compare with).
  old, now = flatten(stored), flatten(config.model.to_dict())
  diffs = [k for k in sorted(old.keys() & now.keys())
           if k not in FREE_MODEL_KEYS and old[k] != now[k]]
  if not diffs:
    return
  show = lambda v: json.dumps(v) if isinstance(v, str) else str(v)
  listed = "; ".join(f"model.{k} is {show(now[k])} here but {show(old[k])} in the {what}"
                     for k in diffs)
  hint = ("use the workdir's settings, or another --workdir (to start from this model with "
          f"other shapes: --config.init.checkpoint={as_path(directory) / 'model'})"
          if training else f"leave out --config to use the {what}'s config.json, or give the "
          "config it was trained with")
  raise ConfigMismatchError(f"the config does not match the model in {what} {directory}: "
                            f"{listed}; {hint}")


def check_init_files(config) -> None:
  """`config.init.backbone` / `config.init.checkpoint` exist, and at most one is set."""
  init = init_lib.InitConfig.from_config(config)
  given = {key: path for key, path in (("backbone", init.backbone_file),
                                       ("checkpoint", init.checkpoint)) if path}
  init_lib.check_backbone_file(init)               # where to get a missing ImageNet file
  if len(given) > 1:
    raise UserError("set only one of config.init.backbone and config.init.checkpoint (a model "
                    "checkpoint already holds a backbone)")
  for key, path in given.items():
    if not as_path(path).exists():
      raise UserError(f"config.init.{key}={path} does not exist")


def check_training_config(config, workdir, num_devices: int, num_processes: int) -> bool:
  """Everything a training run can check before it creates its workdir or compiles. Returns
  whether the run resumes (the workdir holds a training checkpoint)."""
  check_batch_sizes(config, num_devices, num_processes)
  root = as_path(workdir) / "checkpoints"   # holds a step directory (no orbax needed)
  if resumes := root.exists() and any(p.name.isdigit() for p in root.iterdir()):
    # A resumed run takes every parameter from its checkpoint: the init files are not read.
    check_against_checkpoint(config, workdir, "workdir", training=True)
  else:
    check_init_files(config)
  return resumes


def describe_shape_mismatch(mismatches: Sequence[Tuple[str, Tuple[int, ...], Tuple[int, ...]]],
                            model_config, directory) -> str:
  """One line naming the parameters whose stored shape differs, and the config keys behind it."""
  shown = "; ".join(f"{path}: stored {tuple(old)}, this config {tuple(new)}"
                    for path, old, new in list(mismatches)[:4])
  more = f" (and {len(mismatches) - 4} more)" if len(mismatches) > 4 else ""
  keys = _keys_in_shapes(mismatches, model_config)
  if not keys and all(p.startswith(("opt_state", "ema_params")) for p, _, _ in mismatches):
    keys = ["the optimiser settings (optim.grad_accum_steps, optim.ema_decay, ...)"]
  blame = (f"; set by {', '.join(keys)}" if keys else "")
  return (f"the checkpoint in {directory} holds a model of other shapes: {shown}{more}{blame} "
          f"(use the config the checkpoint was trained with)")


def _keys_in_shapes(mismatches, model_config) -> List[str]:
  """Config keys whose current value is a dimension that differs from the stored one."""
  keys = []
  for key in SHAPE_KEYS:
    value = model_config
    for part in key.split("."):
      value = value.get(part) if hasattr(value, "get") else None
    if not isinstance(value, int):
      continue
    for _, old, new in mismatches:
      if len(old) == len(new) and any(n == value and o != n for o, n in zip(old, new)):
        keys.append(f"model.{key}={value}")
        break
  return keys

