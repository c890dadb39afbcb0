"""Restoring a workdir: a corrupt newest checkpoint falls back to the newest one that restores
(left on disk, then set aside by training), none restorable is one clear error, and parameters of
other shapes name their path and the config key behind them. Small states, nothing compiles;
the training loop and predict on a real workdir: tests/test_train_loop.py."""

import jax
import numpy as np
import pytest

from focus_detr_jax.config_check import ConfigMismatchError
from focus_detr_jax.train import checkpointing


def _state(value, hidden=8):
  return {"params": {"dense": {"kernel": jax.numpy.full((hidden, hidden), value, jax.numpy.float32)},
                     "bias": jax.numpy.zeros((hidden,))}, "step": jax.numpy.int32(value)}


def _truncate_largest_file(step_dir):
  files = sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest = files[-1]
  largest.write_bytes(largest.read_bytes()[:16])


@pytest.fixture
def workdir(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path, keep=5, async_save=False)
  for step in (2, 4, 6):
    ckpt.save(step, _state(step))
  ckpt.close()
  return tmp_path


def test_corrupt_newest_falls_back_and_is_kept(workdir, caplog):
  _truncate_largest_file(workdir / "checkpoints" / "6")
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  restored = ckpt.restore(_state(0))
  assert int(restored["step"]) == 4
  np.testing.assert_array_equal(restored["params"]["dense"]["kernel"], 4.0)
  assert [s for s, _ in ckpt.skipped] == [6]
  assert "cannot be restored, skipped" in caplog.text and "restored step 4" in caplog.text
  assert (workdir / "checkpoints" / "6").exists()          # never deleted

  # Training sets it aside, so that a new save of step 6 does not collide with it.
  ckpt.set_aside([6])
  assert (workdir / checkpointing.UNRESTORABLE_DIR / "6").exists()
  ckpt.save(6, _state(60))
  ckpt.wait()
  assert int(ckpt.restore(_state(0))["step"]) == 60
  ckpt.close()


def test_no_restorable_checkpoint_is_one_error(workdir):
  for step in (2, 4, 6):
    _truncate_largest_file(workdir / "checkpoints" / str(step))
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"no checkpoint in .* can be restored: step 6: .*; step 4: .*; step 2"):
    ckpt.restore(_state(0))
  ckpt.close()


def test_other_shapes_name_the_parameter_and_the_config_key(workdir):
  import ml_collections
  model_config = ml_collections.ConfigDict({"hidden_dim": 16, "num_classes": 4})
  ckpt = checkpointing.Checkpointer(workdir, async_save=False, model_config=model_config)
  with pytest.raises(ConfigMismatchError) as info:
    ckpt.restore(_state(0, hidden=16))
  message = str(info.value)
  assert "params/dense/kernel: stored (8, 8), this config (16, 16)" in message
  assert "model.hidden_dim=16" in message and "num_classes" not in message
  assert (workdir / "checkpoints" / "6").exists() and not ckpt.skipped   # not a corrupt step
  ckpt.close()
