"""Serialise the jitted inference function (model apply + `postprocess`) with `jax.export`: one
StableHLO program for one fixed input shape (usage and inputs: docs/inference.md, section 3).

Decision: the variables are **arguments** of the exported function, not baked-in constants. The
file stores both the serialised `jax.export.Exported` and the variables (flax msgpack), so it is
self-contained; `load_exported` binds the stored variables. Why arguments: one program serves any
checkpoint of the same architecture (`call_with_variables` / re-save with other weights), and
~50 M float32 weights as MLIR dense constants would make serialisation slow and the module huge.

File layout (a small container, versioned): magic `FDJXEXP1`, then three length-prefixed blobs:
JSON metadata, the serialised Exported, the msgpack variables. Format 2 takes `pixel_valid`;
format 1 (older files, refused) took detrex's `padding_mask` (True = padded).
"""

import json
import struct
from typing import Any, Dict, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from focus_detr_jax.predict import default_num_select, predict

_MAGIC = b"FDJXEXP1"
FORMAT_VERSION = 2


def inference_function(model, num_select: int = 300):
  """The pure inference function `(variables, images, pixel_valid, image_size) -> detections`.

  The same function is exported and used in-process (tests, benchmarks), so both run the same
  computation: model apply in eval mode, then `postprocess` (top-`num_select`, no NMS).
  """
  def infer(variables, images, pixel_valid, image_size):
    return predict(model, variables, images, pixel_valid, image_size, num_select=num_select)
  return infer


def export_inference(model, variables, batch_size: int, height: int, width: int, path: str,
                     num_select: Optional[int] = None,
                     platforms: Optional[Sequence[str]] = None) -> jax_export.Exported:
  """Exports the inference function for fixed input shapes and writes it (with variables) to path.

  Args:
    model: a FocusDETR; variables: its variables (`params` and, for FrozenBN, `frozen`).
    num_select: detections per image (default: 300, capped at Q * C).
    platforms: lowering platforms, e.g. ("cpu", "cuda"); default the current backend.
  Returns:
    the `jax.export.Exported`.
  """
  variables = flax.core.unfreeze(variables)
  num_select = default_num_select(model, num_select)
  infer = inference_function(model, num_select)
  var_specs = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                                     variables)
  shapes = dict(images=[batch_size, height, width, 3], pixel_valid=[batch_size, height, width],
                image_size=[batch_size, 2])
  exported = jax_export.export(jax.jit(infer), platforms=platforms)(var_specs, *(
      jax.ShapeDtypeStruct(shape, dtype)
      for shape, dtype in zip(shapes.values(), (jnp.float32, jnp.bool_, jnp.int32))))
  meta = dict(format_version=FORMAT_VERSION, batch_size=batch_size, height=height, width=width,
              num_select=num_select, num_queries=model.num_queries,
              num_classes=model.num_classes, platforms=list(exported.platforms),
              jax_version=jax.__version__, inputs=shapes)
  blobs = [json.dumps(meta).encode(), bytes(exported.serialize()),
           flax.serialization.msgpack_serialize(jax.device_get(variables))]
  with open(path, "wb") as f:
    f.write(_MAGIC)
    for blob in blobs:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
  return exported


class ExportedInference:
  """A loaded export: call with (images, pixel_valid, image_size) -> detections dict."""

  def __init__(self, exported: jax_export.Exported, variables: Dict[str, Any],
               meta: Dict[str, Any]):
    self.exported, self.variables, self.meta = exported, variables, meta

  def call_with_variables(self, variables, images, pixel_valid, image_size):
    """Runs the exported program with other variables of the same structure and shapes."""
    return self.exported.call(variables, jnp.asarray(images, jnp.float32),
                              jnp.asarray(pixel_valid, jnp.bool_),
                              jnp.asarray(image_size, jnp.int32))

  def __call__(self, images, pixel_valid, image_size):
    return self.call_with_variables(self.variables, images, pixel_valid, image_size)


def load_exported(path: str) -> ExportedInference:
  """Reads a file written by `export_inference`; returns a callable with the variables bound."""
  with open(path, "rb") as f:
    data = f.read()
  if data[:len(_MAGIC)] != _MAGIC:
    raise ValueError(f"{path} is not a focus_detr_jax export (bad magic)")
  blobs, offset = [], len(_MAGIC)
  for _ in range(3):
    (size,) = struct.unpack_from("<Q", data, offset)
    offset += 8
    blobs.append(data[offset:offset + size])
    offset += size
  meta = json.loads(blobs[0].decode())
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path}: export format {meta.get('format_version')}, "
                     f"this code reads {FORMAT_VERSION}")
  exported = jax_export.deserialize(bytearray(blobs[1]))
  variables = jax.tree_util.tree_map(jnp.asarray, flax.serialization.msgpack_restore(blobs[2]))
  return ExportedInference(exported, variables, meta)
