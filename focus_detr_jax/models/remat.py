"""Rematerialisation (`jax.checkpoint`) of the model's repeated blocks: `config.model.remat`.

A setting is `"<scope>"` or `"<scope>:<policy>"`:

- scope: `none`; `decoder` (each decoder layer); `layers` (each encoder and decoder layer);
  `full` (the layers and each backbone block: ResNet bottleneck / Swin block);
- policy (default `nothing`): what a rematerialised block keeps for its backward pass:
  `nothing` (only its inputs: `jax.checkpoint_policies.nothing_saveable`) or `dots`
  (also its matmul outputs without batch dimensions: `dots_with_no_batch_dims_saveable`).

Rematerialisation computes the same function: the backward recomputes the same forward ops
instead of reading them back. XLA may fuse the recomputation differently, so gradients agree
with `none` to float32 rounding, not bitwise (tests/test_remat.py).
It trades recomputation for XLA temporaries; BENCHMARKS.md ("Train step: profile, memory
and rematerialisation") measures each setting. On XLA:CPU it only lowers the temporaries with
the memory-minimising scheduler (`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`;
the default concurrency-optimised scheduler keeps the recomputed buffers alive together).
"""

from typing import Tuple

import flax.linen as nn
import jax

SCOPES = ("none", "decoder", "layers", "full")
POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def parse(setting: str) -> Tuple[str, str]:
  """`"layers:dots"` -> ("layers", "dots"), with a clear error for unknown names."""
  scope, _, policy = (setting or "none").partition(":")
  policy = policy or "nothing"
  if scope not in SCOPES or policy not in POLICIES:
    raise ValueError(f"model.remat={setting!r}: expected '<scope>[:<policy>]' with scope in "
                     f"{SCOPES} and policy in {tuple(POLICIES)}")
  return scope, policy


def wrap(module_class, setting: str, part: str, static_argnums=()):
  """`module_class`, rematerialised when `setting`'s scope covers `part`.

  part: "decoder", "encoder" or "backbone". static_argnums count `self` as 0 (flax).
  """
  scope, policy = parse(setting)
  covered = {"none": (), "decoder": ("decoder",), "layers": ("encoder", "decoder"),
             "full": ("encoder", "decoder", "backbone")}[scope]
  if part not in covered:
    return module_class
  return nn.remat(module_class, policy=POLICIES[policy], static_argnums=static_argnums)
