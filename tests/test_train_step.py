"""Optimiser groups, the train step (overfit, non-finite handling) and the eval metric."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_fake_batch
from focus_detr_jax.train import optim, state as state_lib, steps
from focus_detr_jax.train.objective import Objective


def _batch(config):
  images, pixel_valid = make_fake_batch()
  m = config.data.max_boxes
  boxes = np.zeros((2, m, 4), np.float32)
  labels = np.zeros((2, m), np.int32)
  valid = np.zeros((2, m), bool)
  boxes[0, :2] = [[0.3, 0.3, 0.2, 0.3], [0.6, 0.55, 0.4, 0.3]]
  labels[0, :2] = [1, 3]
  valid[0, :2] = True
  boxes[1, :1] = [[0.5, 0.5, 0.5, 0.5]]
  labels[1, :1] = [2]
  valid[1, :1] = True
  return dict(image=images, pixel_valid=pixel_valid, boxes=jnp.asarray(boxes),
              labels=jnp.asarray(labels), box_valid=jnp.asarray(valid),
              image_size=jnp.asarray([[128, 160], [96, 120]], jnp.int32))


@pytest.fixture(scope="module")
def step_setup(tiny_config, tiny_model_and_variables):
  model, variables = tiny_model_and_variables
  config = tiny_config.copy_and_resolve_references()
  config.optim.lr = 1e-3          # overfit one batch quickly
  tx, schedule = optim.make_optimizer(variables["params"],
                                      optim.OptimConfig.from_config(config.optim), model.backbone)
  step = jax.jit(functools.partial(steps.train_step, model=model,
                                   objective=Objective.from_config(config), tx=tx,
                                   schedule=schedule, ema_decay=config.optim.ema_decay))
  state = state_lib.create_train_state(variables, tx, jax.random.PRNGKey(1), ema=False)
  return step, state, _batch(tiny_config)


def test_param_groups(tiny_model_and_variables):
  model, variables = tiny_model_and_variables
  labels = optim.param_labels(variables["params"], model.backbone)
  assert labels["backbone"]["stem_conv1"]["kernel"] == optim.LABEL_FROZEN
  assert labels["backbone"]["res2_0"]["conv1"]["kernel"] == "backbone_decay"
  assert labels["enc_output_norm"]["scale"] == "other_no_decay"
  assert labels["enc_output_norm"]["bias"] == "other_no_decay"
  assert labels["enc_output"]["bias"] == "other_decay"           # detectron2: biases decay
  assert labels["alpha"] == "other_decay" and labels["level_embeds"] == "other_decay"
  assert labels["encoder_layers_0"]["norm2"]["scale"] == "other_no_decay"


def test_schedule_drops_and_warmup(tiny_config):
  o = tiny_config.optim.copy_and_resolve_references()
  o.lr_drop_steps = (10, 20)
  o.warmup_steps = 4
  schedule = optim.learning_rate_schedule(o)
  np.testing.assert_allclose(schedule(0), o.lr * o.warmup_factor, rtol=1e-6)
  np.testing.assert_allclose(schedule(2), o.lr * (o.warmup_factor * 0.5 + 0.5), rtol=1e-6)
  np.testing.assert_allclose(schedule(5), o.lr, rtol=1e-6)
  np.testing.assert_allclose(schedule(15), o.lr * 0.1, rtol=1e-6)
  np.testing.assert_allclose(schedule(25), o.lr * 0.01, rtol=1e-6)


def test_overfits_one_batch_and_keeps_frozen_stem(step_setup):
  step, state, batch = step_setup
  stem_before = np.asarray(state.params["backbone"]["stem_conv1"]["kernel"])
  matched = lambda m: float(m["loss_class"] + m["loss_bbox"] + m["loss_giou"])
  state, first = step(state, batch)
  for _ in range(30):
    state, metrics = step(state, batch)
  assert bool(metrics["finite"])
  # The final layer's matched losses (the denoising terms are re-drawn every step).
  assert matched(metrics) < 0.6 * matched(first), (matched(first), matched(metrics))
  assert float(metrics["total_loss"]) < float(first["total_loss"])
  np.testing.assert_array_equal(state.params["backbone"]["stem_conv1"]["kernel"], stem_before)
  assert int(state.step) == 31


def test_non_finite_step_changes_nothing(step_setup):
  step, state, batch = step_setup
  bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
  new_state, metrics = step(state, bad)
  assert not bool(metrics["finite"])
  for a, b in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
    np.testing.assert_array_equal(a, b)
