"""The one prediction function: model apply (eval mode) + `postprocess`, optionally the token maps.

    dets = predict(model, variables, images, pixel_valid, image_size, num_select=300)
    dets, maps = predict(..., with_maps=True)              # + token maps for the pictures
    dets, maps = predict_on_host(model, variables, ...)    # jitted, numpy results

Used by the evaluator, `inference.py` (files, dataset splits), `export.py` (the serialised
program) and the TensorBoard pictures, so all of them run the same computation. The model is a
static argument of `jax.jit` (it is hashable: `FocusDETR.from_config`), so one program is
compiled per (model, num_select, with_maps, input shapes) and shared by all callers.

`maps` (per image, `selection_maps`): `fg_score` [N] (FTS logits of every token, levels finest
first), `token_valid` [N], `updated` [E, N] (the tokens encoder layer e updates: the first
min(focus_token_nums, K_e) of its foreground ranking), `objects` [E, N] (the OESM object tokens
of layer e: the multi-category-score top-k that run self-attention), `focus_token_nums`,
`layer_counts`.
"""

from typing import Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.models.postprocess import postprocess


def predict(model, variables, images, pixel_valid, image_size, output_size=None, *,
            num_select: int, with_maps: bool = False):
  """Detections of a batch (traceable).

  Args:
    images: [B, H, W, 3] float32, normalised and zero-padded; pixel_valid: [B, H, W] bool,
      True = image pixel, False = padding; image_size: [B, 2] int32 (h, w) of the unpadded
      network input.
    output_size: [B, 2] (h, w) the boxes are scaled to (e.g. the original image); default
      `image_size`.
    num_select: detections per image; with_maps: also return the token maps.
  Returns:
    `postprocess`'s dict scores/labels/boxes (xyxy)/valid/query [B, K...]; with `with_maps`,
    (that dict, `selection_maps`).
  """
  outputs = model.apply(variables, images, pixel_valid, train=False,
                        mutable=["intermediates"] if with_maps else False)
  if with_maps:
    outputs, state = outputs
  dets = postprocess(outputs["pred_logits"], outputs["pred_boxes"], image_size, output_size,
                     num_select=num_select)
  return (dets, selection_maps(state["intermediates"], outputs["fg_score"].shape[1])
          ) if with_maps else dets


jit_predict = jax.jit(predict, static_argnames=("model", "num_select", "with_maps"))


def default_num_select(model, num_select: Optional[int] = None) -> int:
  """`num_select` (default 300) capped at the number of (query, class) pairs."""
  return min(300 if num_select is None else int(num_select), model.num_queries * model.num_classes)


def predict_on_host(model, variables, images, pixel_valid, image_size, output_size=None,
                    num_select: Optional[int] = None):
  """(detections, token maps) of one batch as numpy (jitted once per model, num_select, shape).

  Boxes are in `output_size` pixels (default `image_size`).
  """
  image_size = jnp.asarray(image_size, jnp.int32)
  output_size = image_size if output_size is None else jnp.asarray(output_size, jnp.int32)
  dets, maps = jit_predict(model, variables, jnp.asarray(images, jnp.float32),
                           jnp.asarray(pixel_valid, bool), image_size, output_size,
                           num_select=default_num_select(model, num_select), with_maps=True)
  return jax.device_get(dets), jax.device_get(maps)


def per_image(tree: Mapping[str, np.ndarray], b: int) -> Dict[str, np.ndarray]:
  """Row `b` of every array of a batch dict."""
  return {k: np.asarray(v)[b] for k, v in tree.items()}


def selection_maps(intermediates, num_tokens: int):
  """Traceable: the `intermediates` collection of one forward pass -> token maps.

  Returns dict fg_score [B, N], token_valid [B, N], updated [B, E, N] bool,
  objects [B, E, N] bool, focus_token_nums [B], layer_counts [B, E].
  """
  first = lambda name: intermediates[name][0]   # sow stores a tuple of values
  fg_score = first("fg_score")
  b = fg_score.shape[0]
  focus = first("focus_token_nums")
  counts = first("layer_counts")
  rows_b = jnp.arange(b)[:, None]
  updated, objects = [], []
  e = 0
  while f"encoder_layer{e}" in intermediates:
    info = first(f"encoder_layer{e}")
    idx = info["fg_inds"]
    k = idx.shape[1]
    write_back = jnp.arange(k)[None, :] < jnp.minimum(focus, counts[:, e])[:, None]
    updated.append(jnp.zeros((b, num_tokens), jnp.int8).at[rows_b, idx].max(
        write_back.astype(jnp.int8)) > 0)
    obj = jnp.take_along_axis(idx, info["sel_local"], axis=1)
    objects.append(jnp.zeros((b, num_tokens), jnp.int8).at[rows_b, obj].max(
        info["sel_valid"].astype(jnp.int8)) > 0)
    e += 1
  return dict(fg_score=fg_score, token_valid=first("token_valid"),
              updated=jnp.stack(updated, axis=1), objects=jnp.stack(objects, axis=1),
              focus_token_nums=focus, layer_counts=counts)
