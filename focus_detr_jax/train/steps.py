"""Pure step functions: `train_step(state, batch) -> (state, metrics)` and `predict_step`.

No I/O here: the loop jits them with shardings (train/loop.py). A non-finite loss or gradient
leaves the state unchanged and reports `finite = False`; the loop stops with a message.
"""

import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import optax

from focus_detr_jax.models.postprocess import postprocess
from focus_detr_jax.train.criterion import LossConfig
from focus_detr_jax.train.objective import model_loss


def train_step(state, batch, *, model, config, tx, schedule, loss_config: LossConfig):
  """One optimisation step on a (global) batch.

  Returns the new state and metrics: every weighted loss term, `total_loss`, `grad_norm`
  (before clipping), `lr`, `num_boxes`, `num_nonfinite_costs` and `finite`.
  """
  key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    return model_loss(model, params, state.extra, batch, config, key=key,
                      loss_config=loss_config)

  (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    decay = config.optim.ema_decay
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema)
  # A non-finite step changes nothing (the loop stops and names the last good checkpoint).
  new_state = jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new_state,
                                     state.replace(step=state.step))
  metrics = {name: value for name, value in aux["weighted"].items()}
  metrics.update(total_loss=total, grad_norm=grad_norm, lr=schedule(state.step),
                 num_boxes=batch["box_valid"].sum(), finite=finite,
                 num_nonfinite_costs=aux["num_nonfinite_costs"])
  return new_state, metrics


def predict_step(variables, batch, *, model, num_select: int):
  """Eval forward + post-processing to `orig_size` pixels (COCO-style detections)."""
  outputs = model.apply(variables, batch["image"], batch["padding_mask"], train=False)
  return postprocess(outputs["pred_logits"], outputs["pred_boxes"], batch["image_size"],
                     batch.get("orig_size", batch["image_size"]), num_select=num_select)
