"""The detrex optimiser in optax (spec §9).

AdamW (lr 1e-4, betas 0.9/0.999, weight decay 1e-4) with detectron2's parameter groups:
backbone parameters at lr x `backbone_lr_mult`, no weight decay on normalisation parameters
(LayerNorm/GroupNorm scale and bias), frozen parameters (detectron2 `freeze_at`) outside the
optimiser; global-norm gradient clipping (0.1) before the update; a step schedule with optional
linear warmup; optional gradient accumulation.
"""

import re
from typing import Any, Callable

import flax
import jax.numpy as jnp
import optax

LABEL_FROZEN = "frozen"


def _is_frozen(path, config) -> bool:
  """detectron2 freeze_at for the ResNet backbone: 1 = stem, 2 = stem + res2, ..."""
  bb = config.model.backbone
  if not path or path[0] != "backbone" or bb.name != "resnet" or len(path) < 2:
    return False
  module = path[1]
  if module.startswith("stem"):
    return bb.freeze_at >= 1
  m = re.match(r"res(\d)_", module)
  return bool(m) and bb.freeze_at >= int(m.group(1))


def param_labels(params, config):
  """Pytree of labels: 'frozen', or '{backbone|other}_{decay|no_decay}'.

  A parameter is a normalisation parameter when its module has a `scale` (LayerNorm/GroupNorm);
  FrozenBN statistics are not parameters at all.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {}
  for path in flat:
    if _is_frozen(path, config):
      labels[path] = LABEL_FROZEN
      continue
    group = "backbone" if path[0] == "backbone" else "other"
    is_norm = (path[:-1] + ("scale",)) in flat
    labels[path] = f"{group}_{'no_decay' if is_norm else 'decay'}"
  return flax.traverse_util.unflatten_dict(labels)


def learning_rate_schedule(optim_config) -> Callable[[Any], Any]:
  """detectron2 multi-step schedule (x factor at each drop step) with linear warmup."""
  base = optim_config.lr
  boundaries = {int(s): optim_config.lr_drop_factor for s in optim_config.lr_drop_steps}
  steps = optax.piecewise_constant_schedule(base, boundaries) if boundaries else (
      optax.constant_schedule(base))
  warmup = int(optim_config.warmup_steps)
  if warmup <= 0:
    return steps
  factor = optim_config.warmup_factor

  def schedule(step):
    alpha = jnp.minimum(step / warmup, 1.0)
    return steps(step) * (factor * (1 - alpha) + alpha)

  return schedule


def make_optimizer(params, config):
  """(optax transformation, main learning-rate schedule) for `params`."""
  o = config.optim
  main = learning_rate_schedule(o)
  backbone = lambda step: main(step) * o.backbone_lr_mult

  def adamw(lr, wd):
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=wd)

  transforms = {
      "backbone_decay": adamw(backbone, o.weight_decay),
      "backbone_no_decay": adamw(backbone, 0.0),
      "other_decay": adamw(main, o.weight_decay),
      "other_no_decay": adamw(main, 0.0),
      LABEL_FROZEN: optax.set_to_zero(),
  }
  tx = optax.multi_transform(transforms, param_labels(params, config))
  if o.clip_norm and o.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx, main
