"""COCO configs start from detrex's ImageNet backbone; without the file training refuses to start
(before anything is built or compiled) unless `--config.init.backbone=none`."""

import importlib

import pytest

from focus_detr_jax import config_check
from focus_detr_jax.convert import init as init_lib

COCO_CONFIGS = ("focus_detr_r50_4scale_12ep", "focus_detr_r50_4scale_24ep",
                "focus_detr_r50_4scale_36ep", "focus_detr_r101_4scale_12ep",
                "focus_detr_r101_4scale_24ep", "focus_detr_r101_4scale_36ep",
                "focus_detr_swin_tiny_224_4scale_12ep", "focus_detr_swin_tiny_224_4scale_24ep",
                "focus_detr_swin_tiny_224_4scale_36ep", "focus_detr_swin_base_384_4scale_36ep",
                "focus_detr_swin_large_384_4scale_36ep")


def _config(name):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", COCO_CONFIGS)
def test_every_coco_config_names_its_imagenet_file(name):
  config = _config(name)
  file = config.init.backbone.rsplit("/", 1)[-1]
  assert file in init_lib.BACKBONE_SOURCES
  want = {"resnet": f"r{config.model.backbone.depth}_v1.pkl"}.get(config.model.backbone.name)
  assert want is None or file == want
  if config.model.backbone.name == "swin":
    assert str(config.model.backbone.window_size) in file


@pytest.mark.parametrize("name", ["tiny", "demo_synthetic"])
def test_demo_and_tiny_configs_say_none(name):
  config = _config(name)
  assert config.init.backbone == "none"
  init_lib.check_backbone_file(init_lib.InitConfig.from_config(config))
  config_check.check_init_files(config)


def test_missing_file_fails_fast_with_where_to_get_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = _config("focus_detr_r50_4scale_12ep")
  with pytest.raises(init_lib.BackboneFileError) as e:
    config_check.check_init_files(config)
  message = str(e.value)
  assert "pretrained/r50_v1.pkl does not exist" in message
  assert "R-50.pkl" in message and "convert" in message and "--config.init.backbone=none" in message
  swin = _config("focus_detr_swin_tiny_224_4scale_12ep")
  with pytest.raises(init_lib.BackboneFileError, match="swin_tiny_patch4_window7_224.pth"):
    init_lib.check_backbone_file(init_lib.InitConfig.from_config(swin))
  config.init.backbone = ""
  with pytest.raises(init_lib.BackboneFileError, match="is empty"):
    init_lib.check_backbone_file(init_lib.InitConfig.from_config(config))
  # Explicitly none, a whole-model checkpoint, or the file present: accepted.
  config.init.backbone = "none"
  config_check.check_init_files(config)
  (tmp_path / "pretrained").mkdir()
  (tmp_path / "pretrained" / "r50_v1.pkl").write_bytes(b"")
  init_lib.check_backbone_file(
      init_lib.InitConfig.from_config(_config("focus_detr_r50_4scale_12ep")))


def test_training_refuses_before_compiling(tmp_path, monkeypatch):
  from focus_detr_jax.train import loop  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(tmp_path)
  config = _config("tiny")
  config.init.backbone = "pretrained/r50_v1.pkl"
  compiled = []
  monkeypatch.setattr(loop, "init_variables", lambda *a, **k: compiled.append(1))
  with pytest.raises(init_lib.BackboneFileError, match="--config.init.backbone=none"):
    loop.train_and_evaluate(config, str(tmp_path / "run"), evaluate=False)
  assert not compiled and not (tmp_path / "run").exists()


def test_resuming_needs_no_backbone_file(tmp_path, monkeypatch):
  """The checkpoint holds every parameter: a resumed COCO run starts without the ImageNet file
  (a fresh workdir still refuses)."""
  monkeypatch.chdir(tmp_path)
  config = _config("focus_detr_r50_4scale_12ep")
  workdir = tmp_path / "run"
  with pytest.raises(init_lib.BackboneFileError):
    config_check.check_training_config(config, workdir, num_devices=1, num_processes=1)
  (workdir / "checkpoints" / "2000").mkdir(parents=True)
  config_check.check_training_config(config, workdir, num_devices=1, num_processes=1)


def test_layers_start_where_detrex_starts():
  """xavier kernels inside detrex's transformer (FFN, attention output, MaskPredictor,
  ref_point_head) with torch-default biases; torch-default Linear elsewhere (box MLP)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from focus_detr_jax.models import layers  # pylint: disable=import-outside-toplevel
  from focus_detr_jax.models.token_selection import MaskPredictor  # pylint: disable=import-outside-toplevel

  def xavier_like(kernel):
    bound = np.sqrt(6.0 / sum(kernel.shape))
    return 0.9 * bound < float(jnp.abs(kernel).max()) <= bound

  key = jax.random.PRNGKey(0)
  ffn = layers.FFN(64, 256).init(key, jnp.zeros((1, 3, 64)))["params"]
  assert xavier_like(ffn["layers_0_0"]["kernel"]) and xavier_like(ffn["layers_1"]["kernel"])
  bias = ffn["layers_0_0"]["bias"]
  assert 0.9 / 8 < float(jnp.abs(bias).max()) <= 1 / 8          # U(+-1/sqrt(64))
  x = jnp.zeros((1, 3, 64))
  mha = layers.MultiheadAttention(64, 4).init(key, x, x, x)["params"]
  assert xavier_like(mha["out_proj"]["kernel"]) and not mha["out_proj"]["bias"].any()
  mask = MaskPredictor(64).init(key, x)["params"]
  assert all(xavier_like(mask[n]["kernel"]) for n in ("layer1_1", "layer2_0", "layer2_2"))
  ref = layers.MLP(64, 64, 2, xavier=True).init(key, jnp.zeros((1, 128)))["params"]
  assert xavier_like(ref["layers_0"]["kernel"])
  box = layers.MLP(64, 4, 3, last_zero_init=True).init(key, jnp.zeros((1, 64)))["params"]
  k = box["layers_0"]["kernel"]
  assert 0.9 / 8 < float(jnp.abs(k).max()) <= 1 / 8                # torch Linear default
  assert not box["layers_2"]["kernel"].any() and not box["layers_2"]["bias"].any()
