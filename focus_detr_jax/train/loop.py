"""`train_and_evaluate(config, workdir)`: the training loop with checkpoints, logging and eval.

Data-parallel over a `data` mesh axis spanning every device of every host; each host feeds its
share of the global batch. Preemption (SIGTERM) saves and exits; a killed run resumes exactly
from the last checkpoint (state, RNG, input position); a non-finite loss stops the run with the
step and the last good checkpoint in the message.
"""

import functools
import json
import logging
import os
import signal
import time
from typing import Optional

import jax
import numpy as np
from clu import metric_writers
from jax.experimental import multihost_utils

from focus_detr_jax import config_check, visualize, xla_options
from focus_detr_jax.checkpoint import as_path, save_model_checkpoint
from focus_detr_jax.convert import init as init_lib
from focus_detr_jax.data import datasets, device, iterators
from focus_detr_jax.evaluation.evaluator import Evaluator
from focus_detr_jax.models.focus_detr import FocusDETR, init_variables
from focus_detr_jax.train import checkpointing, optim, sharding, state as state_lib, steps
from focus_detr_jax.train.objective import Objective


MODEL_DIR = "model"  # final model checkpoint inside the workdir


class NonFiniteLossError(RuntimeError):
  """Raised when a training step produces a NaN or infinite loss or gradient."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _initialise_from_files(variables, init, model):
  """Apply `config.init.backbone` / `config.init.checkpoint` (convert/init.py), with a report."""
  variables, report = init_lib.apply_init(variables, init, model)
  if report is not None:
    logging.info("initialisation report:\n%s", report)
  return variables


def enable_compilation_cache() -> Optional[str]:
  """Turns on JAX's persistent compilation cache (each training canvas is one compile of the
  step; a restart or a second run then loads them): `$FOCUS_DETR_COMPILATION_CACHE`, default
  `~/.cache/focus_detr_jax/xla`; an empty value, or a cache dir configured already, leaves JAX
  as it is. Returns the directory in use (None: off)."""
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = os.environ.get("FOCUS_DETR_COMPILATION_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "focus_detr_jax", "xla"))
  if not path:
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def make_train_step(model, objective: Objective, optim_config: optim.OptimConfig, tx, schedule,
                    data: datasets.DataConfig, mesh):
  """The jitted `train_step(state, batch)` of the loop: uint8 batches sharded over `mesh`'s data
  axis, normalised (and `pixel_valid` made) inside the step (data/device.py, bit-identical to the
  host's), the state replicated and donated. One XLA program per canvas shape."""
  train_step = functools.partial(steps.train_step, model=model, objective=objective, tx=tx,
                                 schedule=schedule, ema_decay=optim_config.ema_decay)

  def step(state, batch):
    return train_step(state, device.normalize_on_device(batch, data.pixel_mean, data.pixel_std))

  return sharding.jit_data_parallel(step, mesh, donate_state=True)


def _summaries(metrics, rate, steps_left, elapsed, max_minutes=0.0):
  """Every scalar metric plus steps/s (`rate`) and the minutes left: the step count's or the
  time budget's (`max_minutes` from the start, `elapsed` seconds spent), whichever ends first."""
  out = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and k != "finite"}
  out["steps_per_second"] = rate
  eta = steps_left / max(rate, 1e-9) / 60
  if max_minutes:
    eta = min(eta, max(max_minutes - elapsed / 60, 0.0))
  out["eta_minutes"] = eta
  return out


class _StepRate:
  """Steps per second, measured from the end of the first step (its compilation excluded)."""

  def __init__(self, start_time, start_step):
    self.start_time, self.start_step = start_time, start_step
    self.first = None

  def update(self, step, now) -> float:
    if self.first is None:
      self.first = (now, step)
    t0, s0 = self.first if step > self.first[1] else (self.start_time, self.start_step)
    return (step - s0) / max(now - t0, 1e-9)


# Loss terms in the one-line progress log (the rest go to TensorBoard and metrics.jsonl only).
PROGRESS_TERMS = (("loss_class", "cls"), ("loss_bbox", "bbox"), ("loss_giou", "giou"),
                  ("select_loss", "select"))


def progress_line(step, total_steps, summary, elapsed, max_minutes=0.0) -> str:
  """`step 250/2000 | loss 3.214 (cls 0.41 bbox 0.12 giou 0.33) | 2.10 steps/s | 4.5 min left`."""
  terms = " ".join(f"{short} {summary[key]:.3g}" for key, short in PROGRESS_TERMS
                   if key in summary)
  line = (f"step {step}/{total_steps} | loss {summary.get('total_loss', float('nan')):.4g}"
          f"{f' ({terms})' if terms else ''} | {summary['steps_per_second']:.2f} steps/s | "
          f"{summary['eta_minutes']:.1f} min left")
  if max_minutes:
    line += f" (time budget {elapsed / 60:.1f}/{max_minutes:g} min)"
  return line


def _make_writer(workdir):
  """TensorBoard scalars and pictures from process 0 (the progress line is logged separately,
  so the writer does not log every term)."""
  if jax.process_index() > 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(str(workdir))])


def train_and_evaluate(config, workdir, *, evaluate: bool = True,
                       stop_after_steps: Optional[int] = None):
  """Train `config` in `workdir` (resuming if it holds checkpoints). Returns the last metrics.

  SIGTERM is caught from the start: during start-up (data, restore, compilation) it stops the
  run after its first step, with a checkpoint; during the steps, after the current one; after the
  last step, the final model is still written and only the final evaluation is skipped (a rerun
  of the same command does it). All hosts agree on each of these decisions.
  """
  # Process-wide XLA settings (config.train.xla_cpu_scheduler): before JAX starts its backends.
  xla_options.configure(config)
  with _Preemption() as preemption:
    return _train_and_evaluate(config, workdir, preemption, evaluate, stop_after_steps)


def _any_host(flags):
  """Element-wise OR of a bool vector over all processes (every process gets the same answer)."""
  flags = np.asarray(flags, bool)
  if jax.process_count() > 1:
    flags = multihost_utils.process_allgather(flags).reshape(-1, flags.size).any(axis=0)
  return flags


def _train_and_evaluate(config, workdir, preemption, evaluate, stop_after_steps):
  workdir = as_path(workdir)
  # Everything that can be checked without compiling, before the workdir is written.
  resumes = config_check.check_training_config(config, workdir, jax.device_count(),
                                               jax.process_count())
  # The model, objective, optimiser, data and init sections read once into frozen values, which
  # every part below takes (the loop itself reads config.train, config.eval and the seed).
  model = FocusDETR.from_config(config.model)
  objective = Objective.from_config(config)
  optim_config = optim.OptimConfig.from_config(config.optim)
  data = datasets.DataConfig.from_config(config)
  init = init_lib.InitConfig.from_config(config)
  meta = datasets.dataset_meta(data)
  if meta.num_classes != model.num_classes:
    raise config_check.ConfigMismatchError(
        f"config.model.num_classes={model.num_classes} but dataset {meta.name} has "
        f"{meta.num_classes} classes")
  workdir.mkdir(parents=True, exist_ok=True)
  logging.info("persistent compilation cache: %s", enable_compilation_cache())
  mesh = sharding.make_mesh()
  sharding.check_batch_size(data.batch_size, mesh, model.batch_group_size)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = init_variables(model, init_rng)
  if not resumes:   # else restored below: the init files are unused
    variables = _initialise_from_files(variables, init, model)
  tx, schedule = optim.make_optimizer(variables["params"], optim_config, model.backbone)
  state = state_lib.create_train_state(variables, tx, state_rng, ema=optim_config.ema_decay > 0)
  state = jax.device_put(state, sharding.replicated(mesh))

  # uint8 over the wire; normalised inside the step.
  data_iter = iterators.make_train_iterator(data, jax.process_index(), jax.process_count(),
                                            normalize_on_host=False)
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                            model_config=config.model)
  try:
    restored = checkpointer.restore(state, data_iter)
  except Exception:
    checkpointer.close()   # no orbax threads left to complain at exit
    raise
  if restored is not None:
    state = restored
    logging.info("resumed from step %d", int(state.step))
  if checkpointer.skipped:   # keep them, but out of the way of new saves of those steps
    checkpointer.set_aside([s for s, _ in checkpointer.skipped])
  writer = _make_writer(workdir)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  train_step = make_train_step(model, objective, optim_config, tx, schedule, data, mesh)
  evaluator = None
  if evaluate:
    evaluator = Evaluator(model, data, config.model.num_select, workdir,
                          max_batches=config.eval.max_batches or None)

  t = config.train
  total_steps = t.num_steps if stop_after_steps is None else min(
      t.num_steps, int(state.step) + stop_after_steps)
  start_step = int(state.step)
  start_time = time.time()
  step_rate = _StepRate(start_time, start_step)
  last_good = checkpointer.latest_step()
  metrics_host = {}
  eval_metrics = {}
  image_batch = None

  def save(step, best_metrics=None):
    checkpointer.save(step, state, data_iter)
    if best_metrics is not None:
      checkpointer.save(step, state, None, metrics=best_metrics, best=True)

  preempted = False
  step = start_step
  while step < total_steps:
    batch = sharding.global_batch(next(data_iter), mesh)
    state, metrics = train_step(state, batch)
    step += 1
    metrics_host = jax.device_get(metrics)
    rate = step_rate.update(step, time.time())
    if not bool(metrics_host["finite"]):
      checkpointer.wait()
      writer.flush()
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {step} (total_loss="
          f"{float(metrics_host['total_loss'])}, grad_norm={float(metrics_host['grad_norm'])}); "
          f"last good checkpoint: "
          f"{checkpointer.latest.directory / str(last_good) if last_good is not None else 'none'}")
    if step % t.log_every == 0 or step == total_steps:
      elapsed = time.time() - start_time
      summary = _summaries(metrics_host, rate, total_steps - step, elapsed, t.max_minutes)
      writer.write_scalars(step, summary)
      logging.info("%s", progress_line(step, total_steps, summary, elapsed, t.max_minutes))
      _append_jsonl(workdir / "metrics.jsonl", dict(step=step, **summary))
    # Every host must stop (and save) at the same step, or the collectives deadlock.
    flags = _any_host([preemption.requested,
                       bool(t.max_minutes) and time.time() - start_time > 60 * t.max_minutes])
    preempted, stop = bool(flags[0]), bool(flags.any())
    if step % t.checkpoint_every == 0 or step == total_steps or stop:
      save(step)
      last_good = step
    if t.image_log_every and step % t.image_log_every == 0:
      image_batch = _log_images(writer, step, model, state, data, config.model.num_select, meta,
                                image_batch)
    if evaluator is not None and t.eval_every and step % t.eval_every == 0 and not stop:
      eval_metrics = evaluator.run(_eval_variables(state), step)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
      checkpointer.save(step, state, None, metrics={"AP": eval_metrics["AP"]}, best=True)
    if stop:
      logging.info("stopping at step %d (%s)", step,
                   "SIGTERM" if preempted else "time limit")
      break
  checkpointer.wait()
  iterators.log_stats(data_iter, prefix="training input")
  if not preempted:
    # The final parameters as a model checkpoint that predict/evaluate/fine-tuning read.
    save_model_checkpoint(workdir / MODEL_DIR, _eval_variables(state), config)
  final_eval = evaluator is not None and not preempted and (
      not eval_metrics or not t.eval_every or step % t.eval_every)
  sigterm = bool(_any_host([preemption.requested])[0])
  if final_eval and sigterm:
    logging.info("SIGTERM after the last step: final model written, final evaluation skipped "
                 "(rerun the same command to evaluate)")
  elif final_eval:
    eval_metrics = evaluator.run(_eval_variables(state), step)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
  writer.flush()
  checkpointer.close()
  return dict(step=step, train=metrics_host, eval=eval_metrics, state=state,
              preempted=preempted, sigterm=sigterm)


def _log_images(writer, step, model, state, data, num_select, meta, image_batch):
  """TensorBoard pictures of detections and selected tokens on a fixed validation batch.

  Every process computes them (the variables are global arrays) on the same batch (the first
  eval batch of a one-host view of the split); only process 0's writer stores them.
  """
  if image_batch is None:
    image_batch = next(iter(iterators.make_eval_iterator(data, 0, 1)))
  images = visualize.training_images(model, _eval_variables(state), image_batch, data,
                                     num_select, max_images=2, class_names=meta.category_names)
  if images:
    writer.write_images(step, {f"images/{k}": v for k, v in images.items()})
  return image_batch


def _append_jsonl(path, record):
  """Plain-text metric log (process 0): one JSON object per logged step."""
  if jax.process_index() == 0:
    line = json.dumps(record) + "\n"
    if "://" in str(path):  # object stores cannot append: rewrite the (small) file
      path.write_text((path.read_text() if path.exists() else "") + line)
    else:
      with path.open("a") as f:
        f.write(line)


def _eval_variables(state):
  params = state.ema_params if state.ema_params is not None else state.params
  return {"params": params, **state.extra}
