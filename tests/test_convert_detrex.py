"""detrex state_dict <-> Flax variables: every key mapped, clear errors, exact round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focus_detr_jax.convert import detrex as conv
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.parity.weights import build_state_dict


@pytest.fixture(scope="module")
def manifest_and_shapes(r50_set):
  from configs import focus_detr_r50_4scale_12ep
  model = FocusDETR.from_config(focus_detr_r50_4scale_12ep.get_config().model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 320, 480, 3)),
                                             jnp.zeros((1, 320, 480), bool)))
  shapes = {k: v for k, v in shapes.items() if k in ("params", "frozen")}
  path = r50_set / "state_dict_manifest.json"
  return path, build_state_dict(path, 0), shapes


def test_every_key_maps_and_round_trip_is_bitwise(manifest_and_shapes):
  path, sd, shapes = manifest_and_shapes
  variables, report = conv.state_dict_to_variables(sd, shapes)
  manifest = json.loads(path.read_text())
  canonical = [k for k, _, _, _, alias in manifest if alias is None]
  assert len(report["mapped"]) == len(canonical) == 625
  n_ours = sum(1 for _ in jax.tree_util.tree_leaves(variables))
  assert n_ours == len(canonical)
  back = conv.variables_to_state_dict(variables, [row[0] for row in manifest])
  assert list(back) == [row[0] for row in manifest]
  for key in sd:
    assert back[key].dtype == sd[key].dtype and back[key].shape == sd[key].shape, key
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)


def test_missing_unexpected_and_misshaped_keys_are_named(manifest_and_shapes):
  _, sd, shapes = manifest_and_shapes
  bad = dict(sd)
  del bad["transformer.alpha"]
  bad["transformer.not_a_module.weight"] = np.zeros(3, np.float32)
  bad["neck.convs.0.conv.weight"] = np.zeros((256, 511, 1, 1), np.float32)
  with pytest.raises(conv.ConversionError) as err:
    conv.state_dict_to_variables(bad, shapes)
  msg = str(err.value)
  assert "alpha" in msg and "transformer.not_a_module.weight" in msg
  assert "neck.convs.0.conv.weight" in msg and "(256, 511, 1, 1)" in msg


def test_alias_that_differs_is_an_error(manifest_and_shapes):
  _, sd, shapes = manifest_and_shapes
  bad = dict(sd)
  bad["class_embed.6.bias"] = sd["class_embed.6.bias"] + 1
  with pytest.raises(conv.ConversionError, match="class_embed.6.bias"):
    conv.state_dict_to_variables(bad, shapes)
