"""Partial restore: start a model from a backbone file or from a checkpoint with other classes."""

import numpy as np
import pytest

from focus_detr_jax.checkpoint import save_model_checkpoint
from focus_detr_jax.convert import init as init_lib
from focus_detr_jax.convert.detrex import ConversionError
from focus_detr_jax.convert.to_detrex import export_detrex_state_dict
from focus_detr_jax.models.focus_detr import FocusDETR
from test_convert_formats import CAFFE2, torchvision_resnet

HEADS = {"params/class_embed_0/kernel", "params/class_embed_0/bias",
         "params/class_embed_1/kernel", "params/class_embed_1/bias",
         "params/class_embed_2/kernel", "params/class_embed_2/bias", "params/label_enc"}


def small_config(num_classes=5, **model):
  """configs/tiny.py with a FrozenBN ResNet of width 16 (fast, and loadable from ImageNet files)."""
  from configs import tiny
  config = tiny.get_config()
  config.model.backbone.norm = "frozen_bn"
  config.model.backbone.base_width = 16
  config.model.num_classes = num_classes
  for k, v in model.items():
    config.model[k] = v
  return config


def model_of(config):
  return FocusDETR.from_config(config.model)


def apply_init(variables, config):
  """What the trainer does with `config.init`."""
  return init_lib.apply_init(variables, init_lib.InitConfig.from_config(config), model_of(config))


_SHAPES = {}


def fake_variables(config, seed):
  """Random arrays with the model's variable shapes (stands for a trained or fresh model)."""
  key = (config.model.num_classes, config.model.ffn_dim)
  if key not in _SHAPES:
    _SHAPES[key] = init_lib.model_shapes(model_of(config))
  rng = np.random.default_rng(seed)
  flat = {p: rng.normal(size=s.shape).astype(np.float32)
          for p, s in init_lib.flatten(_SHAPES[key]).items()}
  return init_lib.unflatten(flat)


def _flat(variables):
  return {"/".join(p): v for p, v in init_lib.flatten(variables).items()}


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
  """A 'trained' model with 3 classes, as our checkpoint and as a detrex .npz export."""
  config = small_config(num_classes=3)
  variables = fake_variables(config, seed=1)
  root = tmp_path_factory.mktemp("source")
  save_model_checkpoint(root / "ckpt", variables, config)
  state_dict = export_detrex_state_dict(variables, model_of(config))
  np.savez(root / "detrex.npz", **state_dict)
  return variables, root / "ckpt", root / "detrex.npz", state_dict


def _check_heads_reinitialised(report, restored, source, fresh):
  reinit = {r["target"] for r in report["reinitialised"]}
  assert reinit == HEADS
  assert all("num_classes 3 -> 5" in r["reason"] for r in report["reinitialised"])
  restored, source, fresh = _flat(restored), _flat(source), _flat(fresh)
  assert set(restored) == set(fresh)
  for name, value in restored.items():
    np.testing.assert_array_equal(value, fresh[name] if name in HEADS else source[name],
                                  err_msg=name)


def test_checkpoint_with_other_classes_reinitialises_exactly_the_heads(source_model):
  source, ckpt, _, _ = source_model
  config = small_config(num_classes=5)
  fresh = fake_variables(config, seed=2)
  restored, report = init_lib.init_from_checkpoint(fresh, ckpt, model_of(config))
  assert report["kind"] == "model" and report["format"] == "ours"
  _check_heads_reinitialised(report, restored, source, fresh)
  assert {r["source"] for r in report["skipped"]} == HEADS
  total = len(_flat(source))
  assert report["num_source_keys"] == total and report["num_mapped"] == total - len(HEADS)
  assert init_lib.format_report(report).endswith(f"mapped {total - 7}/{total} keys")


def test_detrex_state_dict_with_other_classes(source_model):
  source, _, npz, state_dict = source_model
  config = small_config(num_classes=5)
  fresh = fake_variables(config, seed=2)
  restored, report = init_lib.init_from_checkpoint(fresh, npz, model_of(config))
  assert report["kind"] == "model" and report["format"] == "detrex"
  _check_heads_reinitialised(report, restored, source, fresh)
  skipped = {r["source"] for r in report["skipped"]}
  assert skipped == {f"transformer.decoder.class_embed.{k}.{leaf}" for k in (0, 1)
                     for leaf in ("weight", "bias")} | {
                         "transformer.encoder.enhance_MCSP.0.weight",
                         "transformer.encoder.enhance_MCSP.0.bias", "label_enc.weight"}
  canonical = len(_flat(source))
  assert report["num_source_keys"] == canonical < len(state_dict)   # aliases counted once
  assert report["num_mapped"] == canonical - 7


def test_same_classes_restores_everything(source_model):
  source, ckpt, npz, _ = source_model
  config = small_config(num_classes=3)
  fresh = fake_variables(config, seed=2)
  for src in (ckpt, npz):
    restored, report = init_lib.init_from_checkpoint(fresh, src, model_of(config), kind="model")
    assert report["reinitialised"] == [] and report["skipped"] == []
    assert report["num_mapped"] == report["num_source_keys"]
    for name, value in _flat(restored).items():
      np.testing.assert_array_equal(value, _flat(source)[name], err_msg=name)


def test_mismatches_other_than_the_heads_are_errors(source_model, tmp_path):
  _, ckpt, _, state_dict = source_model
  config = small_config(num_classes=3, ffn_dim=96)
  with pytest.raises(ConversionError, match=r"ffns_0/layers_0_0/kernel.*\(64, 128\)"):
    init_lib.init_from_checkpoint(fake_variables(config, 2), ckpt, model_of(config))
  config = small_config(num_classes=3)
  bad = dict(state_dict)
  del bad["transformer.decoder.norm.weight"]
  bad["transformer.not_a_module.weight"] = np.zeros(3, np.float32)
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(ConversionError) as err:
    init_lib.init_from_checkpoint(fake_variables(config, 2), tmp_path / "bad.npz", model_of(config))
  assert "decoder_norm/scale" in str(err.value)
  assert "transformer.not_a_module.weight" in str(err.value)


def test_exact_conversion_does_not_reinitialise(source_model):
  _, ckpt, _, _ = source_model
  config = small_config(num_classes=5)
  with pytest.raises(ConversionError, match="num_classes=3"):
    init_lib.init_from_checkpoint(init_lib.model_shapes(model_of(config)), ckpt, model_of(config))


def test_backbone_init_from_the_config(tmp_path):
  sd = torchvision_resnet(width=16)
  np.savez(tmp_path / "resnet.npz", **sd)
  config = small_config()
  config.init.backbone, config.init.checkpoint = str(tmp_path / "resnet.npz"), ""
  fresh = fake_variables(config, seed=3)
  restored, report = apply_init(fresh, config)
  assert report["kind"] == "backbone" and report["format"] == "torchvision"
  loaded = {r["source"]: r["target"] for r in report["loaded"]}
  skipped = {r["source"] for r in report["skipped"]}
  assert set(loaded) | skipped == set(sd) and not set(loaded) & skipped   # nothing dropped
  assert len(loaded) == 265 and report["num_source_keys"] == 320
  flat_r, flat_f = _flat(restored), _flat(fresh)
  for name, value in flat_r.items():
    if "/backbone/" in name:
      continue
    np.testing.assert_array_equal(value, flat_f[name], err_msg=name)
  np.testing.assert_array_equal(flat_r["frozen/backbone/res4_1/conv2_norm/running_mean"],
                                sd["layer3.1.bn2.running_mean"])
  reinit = {r["target"] for r in report["reinitialised"]}
  assert reinit == {n for n in flat_f if "/backbone/" not in n}


def test_apply_init_choices_and_fail_fast(tmp_path):
  config = small_config()
  fresh = {"params": {}}
  assert apply_init(fresh, config) == (fresh, None)
  config.init.backbone, config.init.checkpoint = "a.pth", "b"
  with pytest.raises(ValueError, match="only one"):
    apply_init(fresh, config)
  # A refused file fails before any fresh init is built.
  np.savez(tmp_path / "msra.npz", **CAFFE2)
  calls = []
  with pytest.raises(ConversionError, match="Caffe2"):
    init_lib.init_from_checkpoint(lambda: calls.append(1), tmp_path / "msra.npz", model_of(config),
                                  kind="backbone")
  assert calls == []


def test_finetune_config_scales_the_detrex_schedule():
  from configs import finetune_coco_folder
  base = finetune_coco_folder.get_config()
  assert (base.train.num_steps, tuple(base.optim.lr_drop_steps)) == (90000, (82500,))
  assert (base.optim.lr, base.optim.backbone_lr_mult, base.optim.clip_norm) == (1e-4, 0.1, 0.1)
  assert base.model.backbone.freeze_at == 1 and base.data.dataset == "coco_folder"
  coco = finetune_coco_folder.get_config("num_images=118287,batch_size=16")
  assert (coco.optim.epochs, tuple(coco.optim.lr_drop_epochs)) == (12, (11,))
  small = finetune_coco_folder.get_config("num_images=2400,batch_size=16")
  assert small.train.num_steps == 34 * 150 >= finetune_coco_folder.MIN_STEPS
  assert tuple(small.optim.lr_drop_steps) == (31 * 150,) and small.data.batch_size == 16
