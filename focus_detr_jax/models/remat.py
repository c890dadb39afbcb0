"""Rematerialisation (`jax.checkpoint`) of the model's repeated blocks: `config.model.remat`.

A setting is `"<scope>"` or `"<scope>:<policy>"`:

- scope: `none`; `decoder` (each decoder layer); `layers` (each encoder and decoder layer);
  `backbone` (each backbone block: ResNet bottleneck / Swin block); `full` (the layers and the
  backbone blocks);
- policy (default `nothing`): what a rematerialised block keeps for its backward pass:
  `nothing` (only its inputs: `jax.checkpoint_policies.nothing_saveable`) or `dots`
  (also its matmul outputs without batch dimensions: `dots_with_no_batch_dims_saveable`).

`auto` (the default) chooses per training canvas, when the step is traced: `full` where one
device's batch holds more than `AUTO_FULL_ABOVE_PIXELS` pixels (images x height x width of the
padded canvas), else `layers` (`for_batch`, applied by train/objective.py::model_loss; without
a batch, e.g. in evaluation where nothing is differentiated, `auto` means `none`). Measured on
XLA:CPU with the memory-minimising scheduler (R50, batch 2, BENCHMARKS.md): at 512x768 `layers`
has 3.4 GiB of temporaries (`none` 5.4) at no cost in step time on the 2-core CPU; at
800x1333 `layers` leaves 8.0 GiB, `full` 7.8 GiB (`none` 11.6).

Rematerialisation computes the same function: the backward recomputes the same forward ops
instead of reading them back. XLA may fuse the recomputation differently, so gradients agree
with `none` to float32 rounding, not bitwise (tests/test_remat.py).
It trades recomputation for XLA temporaries; BENCHMARKS.md ("Train step: profile, memory
and rematerialisation") measures each setting. On XLA:CPU it only lowers the temporaries with
the memory-minimising scheduler (`config.train.xla_cpu_scheduler="memory"`, our default,
focus_detr_jax/xla_options.py; XLA's own default, the concurrency-optimised scheduler, keeps the
recomputed buffers alive together).
"""

import math
from typing import Sequence, Tuple

import flax.linen as nn
import jax

SCOPES = ("none", "decoder", "layers", "backbone", "full")
POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


AUTO = "auto"
# `auto` rematerialises everything (`full`) above this many pixels per device batch, the
# encoder and decoder layers (`layers`) below: `layers` measured 3.4 GiB at 512x768 x 2 images
# (0.79 M pixels) and 8.0 GiB at 800x1333 x 2 (2.13 M); the COCO canvases below 1.8 M pixels
# (e.g. 800x1067 x 2, 1.71 M) stay well under 8 GiB with it.
AUTO_FULL_ABOVE_PIXELS = 1_800_000
AUTO_SMALL, AUTO_LARGE = "layers", "full"


def parse(setting: str) -> Tuple[str, str]:
  """`"layers:dots"` -> ("layers", "dots"), with a clear error for unknown names. `"auto"` ->
  ("auto", "nothing"): resolved per batch by `resolve`."""
  scope, _, policy = (setting or "none").partition(":")
  policy = policy or "nothing"
  if scope == AUTO and policy == "nothing" and ":" not in (setting or ""):
    return scope, policy
  if scope not in SCOPES or policy not in POLICIES:
    raise ValueError(f"model.remat={setting!r}: expected 'auto' or '<scope>[:<policy>]' with "
                     f"scope in {SCOPES} and policy in {tuple(POLICIES)}")
  return scope, policy


def resolve(setting: str, images_shape: Sequence[int], devices: int = 1) -> str:
  """The setting for a batch of `images_shape` ([B, H, W, C], the global batch split over
  `devices`): `setting` itself unless it is `auto`."""
  if parse(setting)[0] != AUTO:
    return setting
  pixels = math.ceil(images_shape[0] / max(devices, 1)) * images_shape[1] * images_shape[2]
  return AUTO_LARGE if pixels > AUTO_FULL_ABOVE_PIXELS else AUTO_SMALL


def batch_devices() -> int:
  """Devices the traced batch is split over: the `data` axis of the context mesh (1 without)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else int(dict(mesh.shape).get("data", 1))


def for_batch(model, images_shape: Sequence[int]):
  """`model` (a module with a `remat` field) with `auto` resolved for this batch (static: the
  shape is known when the step is traced). Same parameters either way."""
  setting = getattr(model, "remat", "none")
  resolved = resolve(setting, images_shape, batch_devices())
  return model if resolved == setting else model.clone(remat=resolved)


def wrap(module_class, setting: str, part: str, static_argnums=()):
  """`module_class`, rematerialised when `setting`'s scope covers `part`.

  part: "decoder", "encoder" or "backbone". static_argnums count `self` as 0 (flax).
  """
  scope, policy = parse(setting)
  covered = {"auto": (), "none": (), "decoder": ("decoder",), "layers": ("encoder", "decoder"),
             "backbone": ("backbone",), "full": ("encoder", "decoder", "backbone")}[scope]
  if part not in covered:
    return module_class
  return nn.remat(module_class, policy=POLICIES[policy], static_argnums=static_argnums)
