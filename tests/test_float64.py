"""The float64 numerics mode (`model.dtype = "float64"` under `jax.enable_x64`).

It exists for parity studies (scripts/check_parity.py --dtype float64 / --sensitivity): every
float32 island (softmax logits, sampling locations, heads, top-k keys, positions, proposals) must
follow the compute dtype up to float64, or the "exact" run silently rounds to float32 somewhere.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_fake_batch
from focus_detr_jax.models.focus_detr import FocusDETR, compute_dtype


def _float_leaves(tree, prefix=""):
  """(path, array) of every floating leaf of a pytree."""
  return [(prefix + jax.tree_util.keystr(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
          if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)]


@pytest.fixture(scope="module")
def runs(tiny_config):
  """float32 run (free top-k) and float64 run with the float32 run's indices forced."""
  images, pixel_valid = make_fake_batch(seed=3)
  config = tiny_config.copy_and_resolve_references()
  model32 = FocusDETR.from_config(config.model)
  variables = jax.jit(lambda k: model32.init(k, images, pixel_valid))(jax.random.PRNGKey(0))
  out32, state = jax.jit(lambda v, x, m: model32.apply(v, x, m, mutable=["intermediates"]))(
      variables, images, pixel_valid)
  inter32 = state["intermediates"]
  layers = range(config.model.num_encoder_layers)
  forced = dict(
      fg_inds=tuple(np.asarray(inter32[f"encoder_layer{l}"][0]["fg_inds"]) for l in layers),
      oesm_sel_local=tuple(np.asarray(inter32[f"encoder_layer{l}"][0]["sel_local"])
                           for l in layers),
      enc_topk_proposals=np.asarray(out32["enc_topk_proposals"]))
  config.model.dtype = "float64"
  model64 = FocusDETR.from_config(config.model)
  with jax.enable_x64(True):
    out64, state64 = jax.jit(lambda v, x, m, f: model64.apply(
        v, x, m, forced=f, mutable=["intermediates"]))(
            variables, images.astype(jnp.float64), pixel_valid, forced)
    out64 = jax.tree_util.tree_map(np.asarray, out64)
    inter64 = jax.tree_util.tree_map(np.asarray, state64["intermediates"])
  return dict(out32=out32, inter32=inter32, out64=out64, inter64=inter64, model64=model64,
              variables=variables, images=images, pixel_valid=pixel_valid)


def test_float64_mode_has_no_float32_island(runs):
  leaves = list(_float_leaves(runs["out64"], "outputs")) + list(
      _float_leaves(runs["inter64"], "intermediates"))
  assert len(leaves) > 20
  narrow = [name for name, value in leaves if value.dtype != np.float64]
  assert not narrow, f"float32 left in the float64 mode: {narrow}"


def test_float64_agrees_with_float32_to_rounding(runs):
  """Same function, higher precision: close to float32, and not bitwise equal to it."""
  for key, atol in (("enc_pred_logits", 1e-4), ("init_reference", 1e-5), ("pred_logits", 5e-3),
                    ("pred_boxes", 5e-4)):
    a32 = np.asarray(runs["out32"][key], np.float64)
    a64 = runs["out64"][key]
    diff = np.abs(a32 - a64).max()
    assert diff <= atol, (key, diff)
  assert np.abs(np.asarray(runs["out32"]["pred_logits"], np.float64)
                - runs["out64"]["pred_logits"]).max() > 0


def test_float64_without_x64_is_refused(runs):
  with jax.enable_x64(False):
    with pytest.raises(ValueError, match="JAX_ENABLE_X64"):
      runs["model64"].apply(runs["variables"], runs["images"], runs["pixel_valid"])


def test_unknown_compute_dtype_is_refused():
  with pytest.raises(ValueError, match="model.dtype='float16'"):
    compute_dtype("float16")
  assert compute_dtype("bfloat16") == jnp.bfloat16
