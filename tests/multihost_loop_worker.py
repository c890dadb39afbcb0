"""Subprocess worker of tests/test_multihost_stop.py: one process of a two-process run of the real
training loop (`train_and_evaluate`), joined by jax.distributed on localhost (CPU, gloo).

Config: configs/tiny.py on a 64x64 canvas, 2 images per device (one batch group), 1 device per
process, no evaluation, checkpoints only at stops and at the end. The process runs four phases,
each one call of `train_and_evaluate` in this same process (standing in for restarts of the
training command; everything the next phase starts from is read back from the workdir):

  sigterm  workdir `run`, from scratch. Process 1 alone gets a real SIGTERM from the test while
           the two processes are in step STOP_AT (this process holds the batch of that step back
           until the signal has been handled: it writes `ready_for_sigterm` and waits, process 0
           waits for it in the step's collectives), so both must stop after step STOP_AT.
  budget   workdir `run`, resumes; process 0 alone has a time budget (`train.max_minutes`) that
           is spent after one step, process 1 has none: both must stop after one more step.
  resume   workdir `run`, resumes and runs to NUM_STEPS.
  full     workdir `full`, from scratch to NUM_STEPS without interruption (the reference).

Every process writes `phases_p<i>.json`: per phase the step it returned at, `preempted`, the
latest checkpoint before and the checkpoints after the call, the SIGTERMs it handled so far; and
`final_params_max_abs_diff` between the `resume` and `full` phases' final parameters.

Later phases reuse the first phase's initial variables and jitted train step (identical model
and optimiser settings): process 1 cannot use JAX's persistent compilation cache on CPU (it is
written by process 0 only, under keys that differ per process), and recompiling would add
~30-60 s per phase on two CPU cores. Restores, input positions, stop flags and saves are the
loop's own.

  --local_stop  sabotage for checking the test: every process decides to stop from its own flags
                only (the all-gather of the stop flags replaced by the identity).
"""

import argparse
import json
import logging
import os
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NUM_STEPS = 4
STOP_AT = 2         # process 1 gets SIGTERM during this step
SIGNALLED = 1       # the process that gets the SIGTERM
BUDGETED = 0        # the process with a time budget in the `budget` phase
BUDGET_MINUTES = 1e-5
_LIVE_ITERATORS = []  # see main()


def parse_args(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--out", required=True, help="workdirs and results go here")
  p.add_argument("--coordinator", required=True)
  p.add_argument("--process_id", type=int, required=True)
  p.add_argument("--num_processes", type=int, default=2)
  p.add_argument("--local_stop", action="store_true")
  p.add_argument("--signal_timeout", type=float, default=300.0)
  return p.parse_args(argv)


def make_config(num_devices, max_minutes=0.0):
  from configs import tiny
  config = tiny.get_config()
  d = config.data                       # the same synthetic data set as tiny (32 train images)
  d.canvases = ((64, 64),)
  d.train_scales = (48, 56, 64)
  d.train_max_size = 64
  d.crop_resize_scales = (48, 64)
  d.crop_size_range = (32, 48)
  d.eval_scale = 64
  d.eval_max_size = 64
  d.batch_size = config.model.batch_group_size * num_devices
  d.eval_batch_size = num_devices
  config.train.num_steps = NUM_STEPS
  config.train.checkpoint_every = 1000  # saves only where the run stops or ends
  config.train.max_minutes = max_minutes
  return config


def _reuse_compiled(loop):
  """Later `train_and_evaluate` calls reuse the first call's initial variables and train step."""
  import jax
  import jax.numpy as jnp
  cache = {}
  real_init, real_jit = loop.init_variables, loop.sharding.jit_data_parallel

  def init_variables(model, rng):
    if "variables" not in cache:
      cache["variables"] = jax.device_get(real_init(model, rng))
    return jax.tree_util.tree_map(jnp.asarray, cache["variables"])

  def jit_data_parallel(fn, mesh, donate_state=False):
    if "train_step" not in cache:
      cache["train_step"] = real_jit(fn, mesh, donate_state=donate_state)
    return cache["train_step"]

  loop.init_variables = init_variables
  loop.sharding.jit_data_parallel = jit_data_parallel


class _HoldBatch:
  """The loop's data iterator; the batch of step `STOP_AT` waits until SIGTERM was handled."""

  def __init__(self, it, ready_file, handled, timeout):
    self._it, self._ready, self._handled, self._timeout = it, ready_file, handled, timeout
    self._calls = 0

  def __next__(self):
    self._calls += 1
    if self._calls == STOP_AT:
      self._ready.write_text(str(os.getpid()))
      deadline = time.time() + self._timeout
      while not self._handled:
        if time.time() > deadline:
          raise RuntimeError(f"no SIGTERM within {self._timeout}s")
        time.sleep(0.02)
    return next(self._it)

  def __getattr__(self, name):  # save / restore / stats
    return getattr(self._it, name)

  def __setattr__(self, name, value):  # e.g. the loop's `normalize_on_host = False`
    if name.startswith("_"):
      object.__setattr__(self, name, value)
    else:
      setattr(self._it, name, value)


def _checkpoint_steps(workdir):
  root = workdir / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def main(args):
  # Timestamped INFO log (the loop's "stopping at step ...", orbax's saves) for failure reports.
  logging.basicConfig(level=logging.INFO, force=True,
                      format="%(relativeCreated)8.0f %(name)s: %(message)s")
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=args.coordinator,
                             num_processes=args.num_processes, process_id=args.process_id,
                             initialization_timeout=300)
  import flax
  import numpy as np
  from focus_detr_jax.data import iterators
  from focus_detr_jax.train import loop

  i = jax.process_index()
  out = Path(args.out)
  _reuse_compiled(loop)
  if args.local_stop:
    loop.multihost_utils = types.SimpleNamespace(process_allgather=np.asarray)

  # Record SIGTERMs this process handles (the loop's own handler still sets its flag).
  handled = []
  real_handler = loop._Preemption._handler

  def handler(self, signum, frame):
    handled.append(time.time())
    real_handler(self, signum, frame)

  loop._Preemption._handler = handler
  # Keep every phase's input iterator alive until the process ends: destroying a tf.data
  # iterator joins tf.data's autotuning thread, which may sleep out its current optimisation
  # period first (TF 2.21: up to ~60 s; ~30 s observed at the end of the first phase).
  def keep(it):
    _LIVE_ITERATORS.append(it)
    return it

  real_iterator = iterators.make_train_iterator

  records, finals = [], {}
  for phase, workdir in (("sigterm", "run"), ("budget", "run"), ("resume", "run"),
                         ("full", "full")):
    workdir = out / workdir
    hold = phase == "sigterm" and i == SIGNALLED
    iterators.make_train_iterator = (
        (lambda *a, **k: keep(_HoldBatch(real_iterator(*a, **k), out / "ready_for_sigterm",
                                         handled, args.signal_timeout)))
        if hold else lambda *a, **k: keep(real_iterator(*a, **k)))
    config = make_config(jax.device_count(),
                         BUDGET_MINUTES if phase == "budget" and i == BUDGETED else 0.0)
    before = _checkpoint_steps(workdir)
    start = time.time()
    result = loop.train_and_evaluate(config, workdir, evaluate=False)
    record = dict(phase=phase, process_index=i, process_count=jax.process_count(),
                  latest_before=before[-1] if before else None, step=int(result["step"]),
                  state_step=int(np.asarray(result["state"].step.addressable_data(0))),
                  preempted=bool(result["preempted"]), sigterms_handled=len(handled),
                  checkpoints_after=_checkpoint_steps(workdir),
                  model_written=(workdir / loop.MODEL_DIR).exists(),
                  seconds=round(time.time() - start, 1))
    records.append(record)
    print(f"p{i} {json.dumps(record)}", flush=True)
    if phase in ("resume", "full"):
      params = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)),
                                      result["state"].params)
      finals[phase] = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
    del result
  a, b = finals["resume"], finals["full"]
  diff = (max(float(np.abs(a[k] - b[k]).max()) for k in a) if set(a) == set(b) else None)
  (out / f"phases_p{i}.json").write_text(json.dumps(dict(
      phases=records, final_params_max_abs_diff=diff, num_params=len(a))))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(parse_args())
  # Skip interpreter teardown (it would destroy the kept input iterators, see above).
  sys.stdout.flush()
  logging.shutdown()
  os._exit(0)
