"""Compile time of the training step per canvas, cold and from the persistent cache (issue 16).

`measure` lowers and compiles the loop's step (`loop.make_train_step`: uint8 batch normalised on
the device, loss, gradient, optimiser and EMA update) ahead of time from shapes alone, for every
training canvas of a config at the per-device batch, with JAX's persistent compilation cache in
`cache_dir`. `run` runs it in two fresh processes (`python -m focus_detr_jax.benchmarks.compile
SPEC_JSON`): the first compiles ("cold"), the second loads the same programs ("warm"), as a
restarted run would.
"""

import importlib
import json
import sys
import time
from typing import Dict, List

import jax
import jax.numpy as jnp

from focus_detr_jax import benchmarks, xla_options
from focus_detr_jax.benchmarks import measure as bm
from focus_detr_jax.data import canvas as canvas_lib
from focus_detr_jax.convert.init import model_shapes
from focus_detr_jax.data.datasets import DataConfig
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.train import loop, optim, sharding
from focus_detr_jax.train.objective import Objective
from focus_detr_jax.train.state import create_train_state


def abstract_batch(batch: int, height: int, width: int,
                   max_boxes: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one training batch as the loop feeds it (uint8 images, no pixel mask)."""
  s = jax.ShapeDtypeStruct
  return dict(image=s((batch, height, width, 3), jnp.uint8),
              image_size=s((batch, 2), jnp.int32), orig_size=s((batch, 2), jnp.int32),
              image_id=s((batch,), jnp.int32), boxes=s((batch, max_boxes, 4), jnp.float32),
              labels=s((batch, max_boxes), jnp.int32), box_valid=s((batch, max_boxes), bool),
              example_valid=s((batch,), bool))


def train_program(config):
  """(the loop's jitted train step on one device, the abstract train state) of `config`."""
  model = FocusDETR.from_config(config.model)
  mesh = sharding.make_mesh(jax.devices()[:1])
  variables = model_shapes(model)
  optim_config = optim.OptimConfig.from_config(config.optim)
  tx, schedule = optim.make_optimizer(variables["params"], optim_config, model.backbone)
  state = jax.eval_shape(lambda v: create_train_state(v, tx, jax.random.PRNGKey(1),
                                                      ema=optim_config.ema_decay > 0), variables)
  return loop.make_train_step(model, Objective.from_config(config), optim_config, tx, schedule,
                              DataConfig.from_config(config), mesh), state


def measure(spec) -> Dict:
  """One phase: {canvases: [{canvas, lower_s, compile_s}], trace_s, xla_cpu_scheduler, remat}."""
  config = importlib.import_module(f"configs.{spec['config']}").get_config()
  # As the training loop does, before JAX starts its backends.
  xla_options.configure_cpu_scheduler(config.train.xla_cpu_scheduler)
  jax.config.update("jax_compilation_cache_dir", spec["cache_dir"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  t0 = time.perf_counter()
  step, state = train_program(config)
  trace_s = time.perf_counter() - t0
  rows = []
  for h, w in canvas_lib.normalize_canvases(spec.get("canvases") or config.data.canvases):
    batch = abstract_batch(spec["batch"], h, w, config.data.max_boxes)
    _, lower_s, compile_s = bm.compile_jitted(step, state, batch)
    rows.append(dict(canvas=[h, w], lower_s=lower_s, compile_s=compile_s))
    print(f"{h}x{w}: lower {lower_s:.1f} s, compile {compile_s:.1f} s", flush=True,
          file=sys.stderr)
  return dict(canvases=rows, trace_s=trace_s, remat=config.model.remat,
              xla_cpu_scheduler=xla_options.user_cpu_scheduler() or "concurrency")


def run(config: str, batch: int, cache_dir: str, canvases=None) -> Dict[str, List[Dict]]:
  """Both phases, each in a fresh process sharing `cache_dir` (which should start empty)."""
  out = {}
  for phase in ("cold", "warm"):
    spec = dict(config=config, batch=batch, cache_dir=cache_dir, canvases=canvases)
    out[phase], error = benchmarks.run_worker([sys.executable, "-m", __name__, json.dumps(spec)],
                                              stderr=None)   # its progress lines: shown
    if error is not None:
      raise RuntimeError(f"{phase} compile worker failed:\n{error}")
  return out


def markdown(result) -> str:
  cold, warm = result["cold"], result["warm"]
  total = lambda p: sum(r["lower_s"] + r["compile_s"] for r in p["canvases"])  # noqa: E731
  rows = benchmarks.table(
      ["canvas", "cold: lower s", "cold: compile s", "from the cache: lower s", "load s"],
      [[f"{c['canvas'][0]}x{c['canvas'][1]}", f"{c['lower_s']:.1f}", f"{c['compile_s']:.1f}",
        f"{w['lower_s']:.1f}", f"{w['compile_s']:.1f}"]
       for c, w in zip(cold["canvases"], warm["canvases"])])
  rows.append(f"| **all {len(cold['canvases'])}** | | **{total(cold):.0f}** (lower + compile) | "
              f"| **{total(warm):.0f}** (lower + load) |")
  rows.append(f"\nmodel.remat={cold['remat']}, XLA:CPU scheduler {cold['xla_cpu_scheduler']}")
  return "\n".join(rows)


if __name__ == "__main__":
  benchmarks.print_result(measure(json.loads(sys.argv[1])))
