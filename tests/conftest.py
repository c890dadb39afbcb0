"""Shared fixtures: the tiny config, a fake padded batch, the parity data folder."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# The full recorded sets (public, public_800x1067, swin_tiny, swin_base_384): outside the
# repository, in the workspace's shared/parity or wherever FOCUS_DETR_PARITY_ROOT points.
PARITY_ROOT = Path(os.environ.get("FOCUS_DETR_PARITY_ROOT", REPO.parent / "shared" / "parity"))
# The compact R50 set recorded with scripts/record_reference.py, shipped in the repository: the
# R50 parity tests always run on it (a fresh clone has no shared/parity).
IN_REPO_PARITY = REPO / "tests" / "data" / "parity"
R50_COMPACT = IN_REPO_PARITY / "r50_compact"


def full_set_available(name):
  return (PARITY_ROOT / name / "meta.json").exists()


def r50_sets():
  """[(name, dir)] of the R50 sets to run: the in-repo compact set, plus `public` if present."""
  sets = [("r50_compact", R50_COMPACT)]
  if full_set_available("public"):
    sets.append(("public", PARITY_ROOT / "public"))
  return sets


def default_r50_dir():
  """`public` when present, else the in-repo compact set (same layout, same manifest)."""
  return PARITY_ROOT / "public" if full_set_available("public") else R50_COMPACT


@pytest.fixture(scope="session")
def parity_root():
  """The folder of the full sets; tests that need one of them skip (with the reason) without it."""
  if not full_set_available("public"):
    pytest.skip(f"full parity sets not found at {PARITY_ROOT} (set FOCUS_DETR_PARITY_ROOT); "
                f"the R50 stages run on the in-repo set {R50_COMPACT.relative_to(REPO)}")
  return PARITY_ROOT


@pytest.fixture(scope="session")
def r50_set():
  """An R50 set for tests that need any one: `public` when present, else the in-repo set.

  Both share the same state_dict manifest (one file for every R50 set, parity/README).
  """
  return PARITY_ROOT / "public" if full_set_available("public") else R50_COMPACT


@pytest.fixture(scope="session")
def tiny_config():
  from configs import tiny
  return tiny.get_config()


def import_script(name):
  """A module of scripts/ (e.g. `import_script("predict").main(argv)` runs it in-process)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_fake_batch(batch_size=2, canvas=(128, 160), sizes=((128, 160), (96, 120)), seed=0):
  """Normalised random images zero-padded into one canvas: (images, pixel_valid), pixel_valid
  True on image pixels."""
  rng = np.random.default_rng(seed)
  images = np.zeros((batch_size, *canvas, 3), np.float32)
  pixel_valid = np.zeros((batch_size, *canvas), bool)
  for i in range(batch_size):
    h, w = sizes[i % len(sizes)]
    images[i, :h, :w] = rng.normal(size=(h, w, 3))
    pixel_valid[i, :h, :w] = True
  return jnp.asarray(images), jnp.asarray(pixel_valid)


@pytest.fixture(scope="session")
def fake_batch():
  return make_fake_batch()


@pytest.fixture(scope="session")
def tiny_model_and_variables(tiny_config, fake_batch):
  from focus_detr_jax.models.focus_detr import FocusDETR
  model = FocusDETR.from_config(tiny_config.model)
  images, pixel_valid = fake_batch
  variables = jax.jit(lambda k: model.init(k, images, pixel_valid))(jax.random.PRNGKey(0))
  return model, variables
