"""`model.remat` (models/remat.py): the same parameters, loss and gradients as without remat."""

import jax
import numpy as np
import pytest

from focus_detr_jax.models import remat
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.train.objective import Objective, model_loss
from test_train_step import _batch


def _loss_and_grads(config, variables, setting):
  config = config.copy_and_resolve_references()
  config.model.remat = setting
  model = FocusDETR.from_config(config.model)
  extra = {k: v for k, v in variables.items() if k != "params"}
  batch = _batch(config)

  def loss(p):
    return model_loss(model, p, extra, batch, Objective.from_config(config),
                      key=jax.random.PRNGKey(3))[0]

  return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_remat_keeps_loss_and_gradients(tiny_config, tiny_model_and_variables):
  """`full` (backbone blocks + every layer) against `none`: XLA fuses the recomputed forward
  differently, so values agree to float32 rounding, not bitwise."""
  _, variables = tiny_model_and_variables
  loss0, grads0 = _loss_and_grads(tiny_config, variables, "none")
  loss1, grads1 = _loss_and_grads(tiny_config, variables, "full")
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  flat0 = jax.tree_util.tree_leaves_with_path(grads0)
  flat1 = dict(jax.tree_util.tree_leaves_with_path(grads1))
  assert [p for p, _ in flat0] == list(flat1)          # same parameter tree
  # Tolerance on the scale of the whole gradient: small leaves (e.g. `alpha`, ~1e-5) are sums
  # with cancellation, where float32 reordering moves the value by a larger relative amount.
  scale = max(float(np.max(np.abs(g))) for _, g in flat0)
  for path, g0 in flat0:
    np.testing.assert_allclose(flat1[path], g0, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_remat_setting_is_checked():
  assert remat.parse("layers") == ("layers", "nothing")
  assert remat.parse("full:dots") == ("full", "dots")
  with pytest.raises(ValueError, match="model.remat"):
    remat.parse("everything")


def test_auto_resolves_per_canvas_and_device_batch():
  assert remat.parse("auto") == ("auto", "nothing")
  with pytest.raises(ValueError, match="model.remat"):
    remat.parse("auto:dots")
  assert remat.parse("backbone:dots") == ("backbone", "dots")
  assert remat.resolve("auto", (2, 512, 768, 3)) == "layers"    # 0.79 M pixels
  assert remat.resolve("auto", (2, 800, 1067, 3)) == "layers"   # 1.71 M pixels
  assert remat.resolve("auto", (2, 800, 1333, 3)) == "full"     # 2.13 M pixels
  assert remat.resolve("auto", (16, 800, 1333, 3), devices=8) == "full"
  assert remat.resolve("auto", (16, 800, 1333, 3), devices=16) == "layers"
  assert remat.resolve("layers", (2, 800, 1333, 3)) == "layers"


def test_for_batch_clones_only_auto():
  model = FocusDETR(remat="auto")
  assert remat.for_batch(model, (2, 512, 768, 3)).remat == "layers"
  large = remat.for_batch(model, (2, 800, 1333, 3))
  assert large.remat == "full" and model.remat == "auto"
  fixed = FocusDETR(remat="layers")
  assert remat.for_batch(fixed, (2, 800, 1333, 3)) is fixed
  # Inside a step traced under a 2-device `data` mesh, the batch is split in two.
  mesh = jax.sharding.AbstractMesh((2,), ("data",))
  with jax.sharding.use_abstract_mesh(mesh):
    assert remat.batch_devices() == 2
    assert remat.for_batch(model, (4, 800, 1333, 3)).remat == "full"
    assert remat.for_batch(model, (2, 800, 1333, 3)).remat == "layers"
