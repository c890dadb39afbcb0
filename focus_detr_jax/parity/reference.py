"""A recorded reference set (decisions §8) and our model rebuilt on it.

Works on any directory laid out like `shared/parity/public`: the detrex config name comes from
`meta.json`, the weights are rebuilt from `state_dict_manifest.json` and the seed, the inputs from
`inputs.npz`. Downstream of every data-dependent top-k the stages teacher-force the reference's
indices (`forced_from`).
"""

import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.convert import detrex as detrex_convert
from focus_detr_jax.convert.init import model_shapes
from focus_detr_jax.convert.swin import backbone_mapper
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.parity.weights import build_state_dict


def config_for_reference(meta):
  """Our config module for the detrex config named in meta.json."""
  name = Path(meta["config"]).stem
  module = importlib.import_module(f"configs.{name}")
  return module.get_config()


class MissingReferenceArray(KeyError):
  """A stage needs an array that this (partial) reference directory does not hold."""


class ReferenceArrays(dict):
  """The arrays of one reference .npz; a missing key raises MissingReferenceArray, which
  run_all turns into a skipped stage group (decisions §8: partial directories)."""

  def __init__(self, path):
    with np.load(path) as z:
      super().__init__({k: z[k] for k in z.files})
    self.file = Path(path).name

  def __missing__(self, key):
    raise MissingReferenceArray(f"{self.file}:{key}")


def load_npz(path):
  """The arrays of one reference file, or None when the file is absent."""
  path = Path(path)
  return ReferenceArrays(path) if path.exists() else None


REFERENCE_FILES = ("inputs", "forward_eval", "losses_train", "foreground_labels", "ms_deform_attn",
                   "dn_train", "grads_train", "grads_train_dn")


def load_reference(reference_dir):
  """{dir, meta, and per file of REFERENCE_FILES its ReferenceArrays (None when absent)}."""
  d = Path(reference_dir)
  meta = json.loads((d / "meta.json").read_text())
  return dict(dir=d, meta=meta, **{name: load_npz(d / f"{name}.npz") for name in REFERENCE_FILES})


def make_batch(inputs, prefix=""):
  """detrex ImageList: normalise, zero-pad bottom/right to the batch max. Returns (images,
  pixel_valid, sizes); pixel_valid: True on image pixels (detrex's mask: True = padded)."""
  images = [inputs[k] for k in sorted(k for k in inputs if k.startswith(prefix + "image_")
                                      and k[len(prefix + "image_"):].isdigit())]
  mean, std = inputs["pixel_mean"], inputs["pixel_std"]
  h = max(im.shape[1] for im in images)
  w = max(im.shape[2] for im in images)
  batch = np.zeros((len(images), h, w, 3), np.float32)
  pixel_valid = np.zeros((len(images), h, w), bool)
  sizes = []
  for i, im in enumerate(images):
    x = im.astype(np.float32).transpose(1, 2, 0)
    batch[i, :x.shape[0], :x.shape[1]] = (x - mean) / std
    pixel_valid[i, :x.shape[0], :x.shape[1]] = True
    sizes.append(x.shape[:2])
  return batch, pixel_valid, np.asarray(sizes, np.int32)


def build_model(config, reference_dir, train):
  """Model + variables from the manifest weights; eval reproduces detrex (no mask)."""
  model_config = config.model
  if not train:
    model_config = model_config.copy_and_resolve_references()
    model_config.eval_padding_mask = False
  model = FocusDETR.from_config(model_config)
  d = Path(reference_dir)
  seed = int(json.loads((d / "meta.json").read_text())["seed"])
  state_dict = build_state_dict(d / "state_dict_manifest.json", seed)
  variables, _ = detrex_convert.state_dict_to_variables(
      state_dict, model_shapes(model), model.num_decoder_layers, model.num_encoder_layers,
      backbone_mapper=backbone_mapper(model))
  return model, jax.tree_util.tree_map(jnp.asarray, variables)


def forced_from(ref, num_layers):
  """Teacher-forced indices: whichever of the cascade, OESM and top-Q the record holds."""
  forced = {}
  if all(f"fg_inds_layer{l}" in ref for l in range(num_layers)):
    forced["fg_inds"] = tuple(ref[f"fg_inds_layer{l}"] for l in range(num_layers))
    if all(f"oesm_sel_local_layer{l}" in ref for l in range(num_layers)):
      forced["oesm_sel_local"] = tuple(ref[f"oesm_sel_local_layer{l}"] for l in range(num_layers))
  if "enc_topk_proposals" in ref:
    forced["enc_topk_proposals"] = ref["enc_topk_proposals"]
  return forced


def run_forward(model, variables, images, pixel_valid, train, forced):
  fn = jax.jit(lambda v, x, m, f: model.apply(v, x, m, train=train, forced=f,
                                              mutable=["intermediates"]))
  outputs, state = fn(variables, jnp.asarray(images), jnp.asarray(pixel_valid), forced)
  inter = jax.tree_util.tree_map(lambda x: np.asarray(x), state["intermediates"])
  inter = {k: (v[0] if isinstance(v, tuple) else v) for k, v in inter.items()}
  return jax.tree_util.tree_map(np.asarray, outputs), inter


def float64_forward(reference, config, images, pixel_valid, forced, train=False):
  """Our model in float64 (under jax.enable_x64) on the same inputs, the given indices forced:
  (outputs, intermediates)."""
  config64 = config.copy_and_resolve_references()
  config64.model.dtype = "float64"
  with jax.enable_x64(True):
    model64, variables64 = build_model(config64, reference["dir"], train=train)
    return run_forward(model64, variables64, images.astype(np.float64), pixel_valid, train,
                       forced)
