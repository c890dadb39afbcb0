"""The model benchmark's measurements (`scripts/benchmark.py`): one task spec (a JSON dict) in,
one result dict out (`run`), in this process (`runner.run_task_in_process`) or in a fresh one
(`runner.run_task`: `python -m focus_detr_jax.benchmarks.tasks SPEC_JSON` prints `RESULT <json>`).

Spec keys: task (baseline, eval, train), config (a key of CONFIGS), batch, height, width, model
(config.model overrides), msda (deformable attention formulation), repeats, max_seconds; eval
also split (FLOPs split), time, time_parts. Weights are random (`random_variables`).
"""

import importlib
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax import benchmarks, export
from focus_detr_jax.benchmarks import measure as bm
from focus_detr_jax.convert.init import model_shapes
from focus_detr_jax.models import deformable_attention as da
from focus_detr_jax.models import token_selection
from focus_detr_jax.models.focus_detr import FocusDETR, feature_level_shapes
from focus_detr_jax.models.postprocess import postprocess
from focus_detr_jax.train.objective import Objective, model_loss

CONFIGS = {"r50": "focus_detr_r50_4scale_12ep", "swin_t": "focus_detr_swin_tiny_224_4scale_12ep",
           "tiny": "tiny"}


def build(spec):
  """(config, model) of a task spec, with its model overrides (keys may be dotted:
  "backbone.depth"; cascade "ones" = 1.0 for every encoder layer, focus_rho "dense")."""
  config = importlib.import_module(f"configs.{CONFIGS[spec['config']]}").get_config()
  for key, value in spec.get("model", {}).items():
    if key == "cascade" and value == "ones":
      value = (1.0,) * config.model.num_encoder_layers
    elif key == "focus_rho" and value == "dense":   # T = K_l = N, every token (DINO's encoder):
      # 1.0 gives int(N * 1.0) + 1 = N + 1 > N and top_k fails; (N - 0.5) / N gives N.
      n = sum(h * w for h, w in feature_level_shapes(spec["height"], spec["width"]))
      value = (n - 0.5) / n
    node = config.model
    *parents, leaf = key.split(".")
    for name in parents:
      node = getattr(node, name)
    setattr(node, leaf, tuple(value) if isinstance(value, list) else value)
  if spec.get("msda"):
    config.model.msda_implementation = spec["msda"]
  return config, FocusDETR.from_config(config.model)


def random_variables(model, seed=0):
  """Variables with the init's structure, filled cheaply (no init compile at full size):
  matrices ~ N(0, 0.02); norm scales and FrozenBN weight/variance 1; other vectors 0."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    last = name.rsplit("/", 1)[-1]
    if last in ("scale", "running_var") or (name.startswith("frozen") and last == "weight"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if len(leaf.shape) >= 2 or last in ("alpha",):
      return jnp.asarray(rng.normal(scale=0.02, size=leaf.shape), leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, model_shapes(model))


def inputs(batch, height, width, seed=0):
  """(images, pixel_valid, image sizes): random images, no padding (pixel_valid all True)."""
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, height, width, 3)).astype(np.float32))
  pixel_valid = jnp.ones((batch, height, width), bool)
  size = jnp.asarray([[height, width]] * batch, jnp.int32)
  return images, pixel_valid, size


def train_batch(config, batch, height, width, boxes_per_image=8, seed=0):
  """A training batch: random images, `boxes_per_image` random boxes and labels per image."""
  rng = np.random.default_rng(seed)
  m = config.data.max_boxes
  images, pixel_valid, size = inputs(batch, height, width, seed)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, size=(batch, m, 2)),     # centres
                          rng.uniform(0.05, 0.3, size=(batch, m, 2))], -1)  # sizes
  labels = rng.integers(0, config.model.num_classes, size=(batch, m)).astype(np.int32)
  valid = np.broadcast_to(np.arange(m) < boxes_per_image, (batch, m))
  return dict(image=images, pixel_valid=pixel_valid, boxes=jnp.asarray(boxes, jnp.float32),
              labels=jnp.asarray(labels), box_valid=jnp.asarray(valid), image_size=size)


def _compiled(fn, args, spec, timed=True):
  """(compiled jitted fn, its lower_s, compile_s, flops and, when `timed`, time_calls' dict)."""
  compiled, lower_s, compile_s = bm.compile_jitted(fn, *args)
  result = dict(lower_s=lower_s, compile_s=compile_s, flops=bm.cost_flops(compiled))
  if timed:
    result.update(bm.time_calls(compiled, *args, repeats=spec.get("repeats", 3),
                                max_seconds=spec.get("max_seconds")))
  return compiled, result


def task_baseline(spec):
  """Same-run machine baseline: jitted backbone (no neck; R50 by default) forward, batch 1."""
  config, model = build(dict(spec, config=spec.get("config", "r50")))
  fn = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone_net(
      x, train=False)))
  images = inputs(1, spec["height"], spec["width"])[0]
  _, result = _compiled(fn, (random_variables(model), images), spec)
  return dict(result, compile_s=result.pop("lower_s") + result["compile_s"],
              memory=bm.peak_memory())


def task_eval(spec):
  """Eval forward + postprocess: latency, throughput, compile, FLOPs, memory (+ FLOPs split)."""
  config, model = build(spec)
  b, h, w = spec["batch"], spec["height"], spec["width"]
  n = sum(hh * ww for hh, ww in feature_level_shapes(h, w))
  result = dict(num_tokens=n, msda=da.resolve_implementation(model.msda_implementation),
                capacities=list(token_selection.cascade_capacities(
                    n, model.focus_rho, model.cascade)))
  variables = random_variables(model)
  images, pixel_valid, size = inputs(b, h, w)
  infer = jax.jit(export.inference_function(model, config.model.num_select))
  _, measured = _compiled(infer, (variables, images, pixel_valid, size), spec,
                          timed=spec.get("time", True))
  result.update(measured)
  if "median_s" in measured:
    result["images_per_s"] = b / measured["median_s"]
  if spec.get("split"):
    memory = jnp.zeros((b, n, model.hidden_dim), jnp.float32)

    def no_encoder(v, x, m, s, mem):
      out = model.apply(v, x, m, train=False, forced={"memory": mem})
      return postprocess(out["pred_logits"], out["pred_boxes"], s,
                         num_select=config.model.num_select)
    def backbone_neck(module, x):
      return module.neck(module.backbone_net(x.astype(module.dtype), train=False))
    parts = dict(backbone_neck=(lambda v, x: model.apply(v, x, method=backbone_neck),
                                (variables, images)),
                 decoder_part=(no_encoder, (variables, images, pixel_valid, size, memory)))
    for name, (fn, args) in parts.items():
      _, part = _compiled(jax.jit(fn), args, dict(repeats=spec.get("repeats", 3)),
                          timed=spec.get("time_parts", True))
      result[f"flops_{name}"] = part["flops"]
      if "median_s" in part:
        result[f"{name}_median_s"] = part["median_s"]
  result["memory"] = bm.peak_memory()
  return result


def program(spec, kind="train"):
  """(jitted function, its (params, batch, key)) on a `train_batch`: kind "train" =
  value_and_grad of `model_loss` (train mode, denoising on), "fwd" = the loss alone, "eval" =
  the eval forward (`model.apply`) of the batch's images."""
  config, model = build(spec)
  extra = dict(random_variables(model))   # the variables but params
  params = extra.pop("params")
  batch = train_batch(config, spec["batch"], spec["height"], spec["width"])
  objective = Objective.from_config(config)

  def loss(p, batch, key):
    return model_loss(model, p, extra, batch, objective, key=key)[0]

  def forward(p, batch, key):
    del key
    return model.apply({"params": p, **extra}, batch["image"], batch["pixel_valid"])

  fn = dict(train=jax.value_and_grad(loss), fwd=loss, eval=forward)[kind]
  return jax.jit(fn), (params, batch, jax.random.PRNGKey(0))


def task_train(spec):
  """loss + grad of `model_loss` (train mode, denoising on): step time, compile, FLOPs, memory."""
  fn, args = program(spec)
  compiled, result = _compiled(fn, args, spec)
  return dict(msda=da.resolve_implementation(spec.get("msda") or "auto"), **result,
              loss=float(compiled(*args)[0]), memory=bm.peak_memory())


TASKS = dict(baseline=task_baseline, eval=task_eval, train=task_train)


def run(spec):
  """One task; its result dict, with worker_s: the seconds it took."""
  t0 = time.perf_counter()
  result = TASKS[spec["task"]](spec)
  return dict(result, worker_s=time.perf_counter() - t0)


if __name__ == "__main__":   # one task in this (fresh) process
  jax.config.update("jax_enable_compilation_cache", False)
  benchmarks.print_result(run(json.loads(sys.argv[1])))
