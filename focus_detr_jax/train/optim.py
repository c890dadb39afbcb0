"""The detrex optimiser in optax (spec §9).

AdamW (lr 1e-4, betas 0.9/0.999, weight decay 1e-4) with detectron2's parameter groups:
backbone parameters at lr x `backbone_lr_mult`, no weight decay on normalisation parameters
(LayerNorm/GroupNorm scale and bias), frozen parameters (detectron2 `freeze_at`) outside the
optimiser; global-norm gradient clipping (0.1) before the update; a step schedule with optional
linear warmup; optional gradient accumulation.
"""

import dataclasses
import re
from typing import Any, Callable, Tuple

import flax
import jax.numpy as jnp
import optax

LABEL_FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """`config.optim` read once: frozen and hashable. The defaults live in configs/common.py."""
  lr: float
  backbone_lr_mult: float
  weight_decay: float
  b1: float
  b2: float
  clip_norm: float
  lr_drop_steps: Tuple[int, ...]
  lr_drop_factor: float
  warmup_steps: int
  warmup_factor: float
  grad_accum_steps: int
  ema_decay: float                # 0 = no EMA of the parameters (the train step applies it)

  @classmethod
  def from_config(cls, optim_config) -> "OptimConfig":
    values = {f.name: optim_config[f.name] for f in dataclasses.fields(cls)}
    return cls(**dict(values, lr_drop_steps=tuple(int(s) for s in values["lr_drop_steps"])))


def _is_frozen(path, bb) -> bool:
  """detectron2 freeze_at for the ResNet backbone: 1 = stem, 2 = stem + res2, ..."""
  if not path or path[0] != "backbone" or bb.name != "resnet" or len(path) < 2:
    return False
  module = path[1]
  if module.startswith("stem"):
    return bb.freeze_at >= 1
  m = re.match(r"res(\d)_", module)
  return bool(m) and bb.freeze_at >= int(m.group(1))


def param_labels(params, backbone):
  """Pytree of labels: 'frozen' (`backbone.freeze_at`), or '{backbone|other}_{decay|no_decay}'.

  A parameter is a normalisation parameter when its module has a `scale` (LayerNorm/GroupNorm);
  FrozenBN statistics are not parameters at all.
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  labels = {}
  for path in flat:
    if _is_frozen(path, backbone):
      labels[path] = LABEL_FROZEN
      continue
    group = "backbone" if path[0] == "backbone" else "other"
    is_norm = (path[:-1] + ("scale",)) in flat
    labels[path] = f"{group}_{'no_decay' if is_norm else 'decay'}"
  return flax.traverse_util.unflatten_dict(labels)


def learning_rate_schedule(o: OptimConfig) -> Callable[[Any], Any]:
  """detectron2 multi-step schedule (x factor at each drop step) with linear warmup."""
  boundaries = {int(s): o.lr_drop_factor for s in o.lr_drop_steps}
  steps = optax.piecewise_constant_schedule(o.lr, boundaries) if boundaries else (
      optax.constant_schedule(o.lr))
  warmup, factor = int(o.warmup_steps), o.warmup_factor
  if warmup <= 0:
    return steps

  def schedule(step):
    alpha = jnp.minimum(step / warmup, 1.0)
    return steps(step) * (factor * (1 - alpha) + alpha)

  return schedule


def make_optimizer(params, o: OptimConfig, backbone):
  """(optax transformation, main learning-rate schedule) for `params` of a model with `backbone`."""
  main = learning_rate_schedule(o)
  backbone_lr = lambda step: main(step) * o.backbone_lr_mult

  def adamw(lr, wd):
    return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=1e-8, weight_decay=wd)

  transforms = {
      "backbone_decay": adamw(backbone_lr, o.weight_decay),
      "backbone_no_decay": adamw(backbone_lr, 0.0),
      "other_decay": adamw(main, o.weight_decay),
      "other_no_decay": adamw(main, 0.0),
      LABEL_FROZEN: optax.set_to_zero(),
  }
  tx = optax.multi_transform(transforms, param_labels(params, backbone))
  if o.clip_norm and o.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  if o.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
  return tx, main
