"""Training state: one pytree holding everything a step changes (checkpointed as a whole)."""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """step [] int32; params (trainable); extra (non-trained collections, e.g. `frozen` FrozenBN
  statistics); opt_state; ema_params (or None); rng (root key, folded with the step)."""
  step: jax.Array
  params: Any
  extra: Any
  opt_state: Any
  ema_params: Optional[Any]
  rng: jax.Array


def create_train_state(variables, tx, rng, ema: bool) -> TrainState:
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k not in ("params", "intermediates")}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra,
                    opt_state=tx.init(params),
                    ema_params=jax.tree_util.tree_map(jnp.asarray, params) if ema else None,
                    rng=rng)
