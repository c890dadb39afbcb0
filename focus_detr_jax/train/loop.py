"""`train_and_evaluate(config, workdir)`: the training loop with checkpoints, logging and eval.

Data-parallel over a `data` mesh axis spanning every device of every host; each host feeds its
share of the global batch. Preemption (SIGTERM) saves and exits; a killed run resumes exactly
from the last checkpoint (state, RNG, input position); a non-finite loss stops the run with the
step and the last good checkpoint in the message.
"""

import functools
import json
import logging
import signal
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from focus_detr_jax.checkpoint import as_path, save_model_checkpoint
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.train import checkpointing, optim, sharding, state as state_lib, steps
from focus_detr_jax.train.criterion import LossConfig


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


def init_variables(model, config, rng):
  """Variables of `model` for the first training canvas (shapes do not depend on the canvas)."""
  h, w = config.data.canvases[0]
  images = jnp.zeros((config.model.batch_group_size, h, w, 3), jnp.float32)
  mask = jnp.zeros(images.shape[:3], bool)
  variables = jax.jit(model.init)(rng, images, mask)
  return {k: v for k, v in variables.items() if k != "intermediates"}


def _initialise_from_files(variables, config):
  """Apply `config.init.backbone` / `config.init.checkpoint` (convert/init.py), with a report."""
  if not (config.init.backbone or config.init.checkpoint):
    return variables
  from focus_detr_jax.convert import init as init_lib
  variables, report = init_lib.init_from_config(variables, config)
  logging.info("initialisation report:\n%s", report)
  return variables


def _summaries(metrics, elapsed, steps_done, total_steps, start_step):
  out = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and k != "finite"}
  rate = steps_done / max(elapsed, 1e-9)
  out["steps_per_second"] = rate
  out["eta_minutes"] = (total_steps - start_step - steps_done) / max(rate, 1e-9) / 60
  return out


def train_and_evaluate(config, workdir, *, evaluate: bool = True,
                       stop_after_steps: Optional[int] = None):
  """Train `config` in `workdir` (resuming if it holds checkpoints). Returns the last metrics.

  SIGTERM is caught from the start: during start-up (data, restore, compilation) it stops the
  run after its first step, with a checkpoint; during the steps, after the current one; after the
  last step, the final model is still written and only the final evaluation is skipped (a rerun
  of the same command does it). All hosts agree on each of these decisions.
  """
  with _Preemption() as preemption:
    return _train_and_evaluate(config, workdir, preemption, evaluate, stop_after_steps)


def _any_host(flags):
  """Element-wise OR of a bool vector over all processes (every process gets the same answer)."""
  flags = np.asarray(flags, bool)
  if jax.process_count() > 1:
    flags = multihost_utils.process_allgather(flags).reshape(-1, flags.size).any(axis=0)
  return flags


def _train_and_evaluate(config, workdir, preemption, evaluate, stop_after_steps):
  from clu import metric_writers
  from focus_detr_jax.data import pipeline

  workdir = as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  meta = pipeline.dataset_meta(config)
  if meta.num_classes != config.model.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but dataset "
                     f"{meta.name} has {meta.num_classes} classes")
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.data.batch_size, mesh, config.model.batch_group_size)
  model = FocusDETR.from_config(config.model)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = _initialise_from_files(init_variables(model, config, init_rng), config)
  tx, schedule = optim.make_optimizer(variables["params"], config)
  state = state_lib.create_train_state(variables, tx, state_rng, ema=config.optim.ema_decay > 0)
  state = jax.device_put(state, sharding.replicated(mesh))

  data_iter = pipeline.make_train_iterator(config, jax.process_index(), jax.process_count())
  checkpointer = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  restored = checkpointer.restore(state, data_iter)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d", int(state.step))
  writer = metric_writers.create_default_writer(str(workdir),
                                                just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=1))

  train_step = sharding.jit_data_parallel(
      functools.partial(steps.train_step, model=model, config=config, tx=tx, schedule=schedule,
                        loss_config=LossConfig.from_config(config)),
      mesh, donate_state=True)
  evaluator = None
  if evaluate:
    from focus_detr_jax.evaluation.evaluator import Evaluator
    evaluator = Evaluator(model, config, workdir, max_batches=config.eval.max_batches or None)

  t = config.train
  total_steps = t.num_steps if stop_after_steps is None else min(
      t.num_steps, int(state.step) + stop_after_steps)
  start_step = int(state.step)
  start_time = time.time()
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
    if not bool(metrics_host["finite"]):
      checkpointer.wait()
      writer.flush()
      raise NonFiniteLossError(
          f"non-finite loss or gradient at step {step} (total_loss="
          f"{float(metrics_host['total_loss'])}, grad_norm={float(metrics_host['grad_norm'])}); "
          f"last good checkpoint: "
          f"{checkpointer.latest.directory / str(last_good) if last_good is not None else 'none'}")
    if step % t.log_every == 0 or step == total_steps:
      summary = _summaries(metrics_host, time.time() - start_time, step - start_step,
                           total_steps, start_step)
      writer.write_scalars(step, summary)
      _append_jsonl(workdir / "metrics.jsonl", dict(step=step, **summary))
    # Every host must stop (and save) at the same step, or the collectives deadlock.
    flags = _any_host([preemption.requested,
                       bool(t.max_minutes) and time.time() - start_time > 60 * t.max_minutes])
    preempted, stop = bool(flags[0]), bool(flags.any())
    if step % t.checkpoint_every == 0 or step == total_steps or stop:
      save(step)
      last_good = step
    if t.image_log_every and step % t.image_log_every == 0:
      image_batch = _log_images(writer, step, model, state, config, meta, image_batch)
    if evaluator is not None and t.eval_every and step % t.eval_every == 0 and not stop:
      eval_metrics = evaluator.run(_eval_variables(state), step)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
      checkpointer.save(step, state, None, metrics={"AP": eval_metrics["AP"]}, best=True)
    if stop:
      logging.info("stopping at step %d (%s)", step,
                   "SIGTERM" if preempted else "time limit")
      break
  checkpointer.wait()
  pipeline.log_stats(data_iter, prefix="training input")
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


def _log_images(writer, step, model, state, config, meta, image_batch):
  """TensorBoard pictures of detections and selected tokens on a fixed validation batch.

  Every process computes them (the variables are global arrays) on the same batch (the first
  eval batch of a one-host view of the split); only process 0's writer stores them.
  """
  from focus_detr_jax import visualize
  from focus_detr_jax.data import pipeline
  if image_batch is None:
    image_batch = next(iter(pipeline.make_eval_iterator(config, 0, 1)))
  images = visualize.training_images(model, _eval_variables(state), image_batch, config,
                                     max_images=2, class_names=meta.category_names)
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
