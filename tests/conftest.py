"""Shared fixtures: the tiny config, a fake padded batch, the parity data folder."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PARITY_ROOT = Path(os.environ.get("FOCUS_DETR_PARITY_ROOT", REPO.parent / "shared" / "parity"))


@pytest.fixture(scope="session")
def parity_root():
  if not (PARITY_ROOT / "public" / "meta.json").exists():
    pytest.fail(f"parity data not found at {PARITY_ROOT} (set FOCUS_DETR_PARITY_ROOT)")
  return PARITY_ROOT


@pytest.fixture(scope="session")
def tiny_config():
  from configs import tiny
  return tiny.get_config()


def import_script(name):
  """A module of scripts/ (e.g. `import_script("predict").main(argv)` runs it in-process)."""
  import sys
  sys.path.insert(0, str(REPO / "scripts"))
  try:
    return __import__(name)
  finally:
    sys.path.pop(0)


def make_fake_batch(batch_size=2, canvas=(128, 160), sizes=((128, 160), (96, 120)), seed=0):
  """Normalised random images zero-padded into one canvas; mask True = padded."""
  rng = np.random.default_rng(seed)
  images = np.zeros((batch_size, *canvas, 3), np.float32)
  mask = np.ones((batch_size, *canvas), bool)
  for i in range(batch_size):
    h, w = sizes[i % len(sizes)]
    images[i, :h, :w] = rng.normal(size=(h, w, 3))
    mask[i, :h, :w] = False
  return jnp.asarray(images), jnp.asarray(mask)


@pytest.fixture(scope="session")
def fake_batch():
  return make_fake_batch()


@pytest.fixture(scope="session")
def tiny_model_and_variables(tiny_config, fake_batch):
  from focus_detr_jax.models.focus_detr import FocusDETR
  model = FocusDETR.from_config(tiny_config.model)
  images, mask = fake_batch
  variables = jax.jit(lambda k: model.init(k, images, mask))(jax.random.PRNGKey(0))
  return model, variables
