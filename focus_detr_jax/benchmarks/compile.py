"""Compile time of the training step per canvas, cold and from the persistent cache (issue 16).

Each training canvas is one XLA program of the loop's step (`loop.make_train_step`: uint8 batch,
normalised on the device, loss, gradient, optimiser and EMA update). `measure` lowers and compiles
it ahead of time from shapes alone (no weights, no data) for every canvas of a config, at the
per-device batch, with JAX's persistent compilation cache in `cache_dir`: a first process compiles
("cold"), a second one loads the same programs ("warm"), as a restarted or second run would.

    python -m focus_detr_jax.benchmarks.compile '{"config": "focus_detr_r50_4scale_12ep", ...}'

prints `RESULT <json>` (one phase in this process); `run` starts the two phases.
"""

import importlib
import json
import subprocess
import sys
import time
from typing import Dict, List

import jax
import jax.numpy as jnp

from focus_detr_jax.data import canvas as canvas_lib
from focus_detr_jax import xla_options
from focus_detr_jax.convert.init import model_shapes
from focus_detr_jax.data.datasets import DataConfig
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.train import loop, optim, sharding
from focus_detr_jax.train.objective import Objective
from focus_detr_jax.train.state import create_train_state


def abstract_batch(batch: int, height: int, width: int, max_boxes: int) -> Dict[str, jax.ShapeDtypeStruct]:
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
  variables = model_shapes(config)
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
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    lowered.compile()
    rows.append(dict(canvas=[h, w], lower_s=t1 - t0, compile_s=time.perf_counter() - t1))
    print(f"{h}x{w}: lower {t1 - t0:.1f} s, compile {rows[-1]['compile_s']:.1f} s", flush=True,
          file=sys.stderr)
  return dict(canvases=rows, trace_s=trace_s, remat=config.model.remat,
              xla_cpu_scheduler=xla_options.user_cpu_scheduler() or "concurrency")


def run(config: str, batch: int, cache_dir: str, canvases=None) -> Dict[str, List[Dict]]:
  """Both phases, each in a fresh process sharing `cache_dir` (which should start empty)."""
  out = {}
  for phase in ("cold", "warm"):
    spec = dict(config=config, batch=batch, cache_dir=cache_dir, canvases=canvases)
    proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], check=True,
                          stdout=subprocess.PIPE, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out[phase] = json.loads(line[len("RESULT "):])
  return out


def markdown(result) -> str:
  rows = ["| canvas | cold: lower s | cold: compile s | from the cache: lower s | load s |",
          "|---|---|---|---|---|"]
  for cold, warm in zip(result["cold"]["canvases"], result["warm"]["canvases"]):
    rows.append(f"| {cold['canvas'][0]}x{cold['canvas'][1]} | {cold['lower_s']:.1f} | "
                f"{cold['compile_s']:.1f} | {warm['lower_s']:.1f} | {warm['compile_s']:.1f} |")
  total = lambda p: sum(r["lower_s"] + r["compile_s"] for r in result[p]["canvases"])  # noqa: E731
  rows.append(f"| **all {len(result['cold']['canvases'])}** | | **{total('cold'):.0f}** (lower + "
              f"compile) | | **{total('warm'):.0f}** (lower + load) |")
  rows.append(f"\nmodel.remat={result['cold']['remat']}, XLA:CPU scheduler "
              f"{result['cold']['xla_cpu_scheduler']}")
  return "\n".join(rows)


if __name__ == "__main__":
  print("RESULT " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
