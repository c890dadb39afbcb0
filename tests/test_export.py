"""`jax.export` round trip of the inference function on the tiny config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_fake_batch
from focus_detr_jax import export


@pytest.fixture(scope="module")
def exported_file(tmp_path_factory, tiny_config, tiny_model_and_variables):
  model, variables = tiny_model_and_variables
  path = tmp_path_factory.mktemp("export") / "tiny.jfx"
  exp = export.export_inference(model, variables, batch_size=2, height=128, width=160,
                                path=str(path), num_select=tiny_config.model.num_select)
  return path, exp


def _image_size(pixel_valid):
  valid = np.asarray(pixel_valid)
  return jnp.asarray(np.stack([valid.any(2).sum(1), valid.any(1).sum(1)], -1), jnp.int32)


def test_reloaded_export_gives_the_same_detections(exported_file, tiny_config,
                                                    tiny_model_and_variables):
  model, variables = tiny_model_and_variables
  path, exp = exported_file
  assert exp.platforms == (jax.default_backend(),)
  infer = export.load_exported(str(path))
  assert infer.meta["batch_size"] == 2 and infer.meta["height"] == 128
  jitted = jax.jit(export.inference_function(model, tiny_config.model.num_select))
  for seed, sizes in ((0, ((128, 160), (96, 120))), (3, ((70, 90), (128, 64)))):
    images, pixel_valid = make_fake_batch(sizes=sizes, seed=seed)
    image_size = _image_size(pixel_valid)
    want = jitted(variables, images, pixel_valid, image_size)
    got = infer(images, pixel_valid, image_size)
    assert set(got) == set(want)
    assert got["scores"].shape == (2, tiny_config.model.num_select)
    np.testing.assert_array_equal(np.asarray(got["labels"]), np.asarray(want["labels"]))
    np.testing.assert_array_equal(np.asarray(got["query"]), np.asarray(want["query"]))
    np.testing.assert_array_equal(np.asarray(got["valid"]), np.asarray(want["valid"]))
    np.testing.assert_allclose(np.asarray(got["scores"]), np.asarray(want["scores"]),
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["boxes"]), np.asarray(want["boxes"]),
                               rtol=0, atol=1e-4)


def test_export_takes_other_weights_and_rejects_other_shapes(exported_file,
                                                             tiny_model_and_variables):
  model, variables = tiny_model_and_variables
  path, _ = exported_file
  infer = export.load_exported(str(path))
  images, pixel_valid = make_fake_batch(seed=5)
  image_size = _image_size(pixel_valid)
  # Variables are arguments: other weights of the same structure give that model's detections.
  other = jax.tree_util.tree_map(lambda x: x * 1.01, variables)
  want = jax.jit(export.inference_function(model, infer.meta["num_select"]))(
      other, images, pixel_valid, image_size)
  got = infer.call_with_variables(other, images, pixel_valid, image_size)
  np.testing.assert_allclose(np.asarray(got["scores"]), np.asarray(want["scores"]), atol=1e-6)
  with pytest.raises(Exception):
    infer(images[:1], pixel_valid[:1], image_size[:1])


def test_bad_file_is_rejected(tmp_path):
  bad = tmp_path / "bad.jfx"
  bad.write_bytes(b"not an export")
  with pytest.raises(ValueError, match="bad magic"):
    export.load_exported(str(bad))
