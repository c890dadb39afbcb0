"""The pure training step: `train_step(state, batch) -> (state, metrics)` (prediction: predict.py).

No I/O here: the loop jits them with shardings (train/loop.py). A non-finite loss or gradient
leaves the state unchanged and reports `finite = False`; the loop stops with a message.
"""

import jax
import jax.numpy as jnp
import optax

from focus_detr_jax.train.objective import Objective, model_loss


def train_step(state, batch, *, model, objective: Objective, tx, schedule, ema_decay: float):
  """One optimisation step on a (global) batch.

  `objective` (`Objective.from_config`), `tx` and `schedule` (`optim.make_optimizer`) and
  `ema_decay` (`config.optim.ema_decay`) are read from the config once, by the caller.

  Returns the new state and metrics: every weighted loss term, `total_loss`, `grad_norm`
  (before clipping), `lr`, `num_boxes`, `num_nonfinite_costs` and `finite`.
  """
  key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    return model_loss(model, params, state.extra, batch, objective, key=key)

  (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema,
                                 params)
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
