"""Subprocess worker of tests/test_distributed.py (one JAX process with its own device count).

The device count must be fixed before JAX initialises, so every scenario runs here in a fresh
interpreter: the test sets XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment.

  reference  (one process) the first train step on one device and on all N devices (losses,
             updated parameters, optimiser state, top-k / matcher / token-selection indices of
             both), then `--steps` steps on all devices, checkpointing after `--save_at`.
  train      `--steps` train steps on all devices of all processes (multi-process with
             jax.distributed on localhost when --num_processes > 1), optionally checkpointing
             after `--save_at` or resuming from the latest checkpoint in `--ckpt_dir`.
Both write per-step losses (record_p<i>.json) and parameters (*.npz) under --out.

Batches are synthetic and deterministic (a function of the step and the global batch size); each
process feeds only its own slice of the global batch, as a host of a pod slice would.
"""

import argparse
import functools
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("mode", choices=["reference", "train"])
  p.add_argument("--out", required=True, help="directory for results")
  p.add_argument("--batch", type=int, default=8, help="global batch size")
  p.add_argument("--canvas", type=int, default=64)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--coordinator", default=None)
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--save_at", type=int, default=0, help="checkpoint after this step (train)")
  p.add_argument("--ckpt_dir", default=None, help="workdir of the Checkpointer (train)")
  p.add_argument("--restore", action="store_true", help="resume from --ckpt_dir (train)")
  return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.num_processes > 1:
  import jax  # noqa: E402
  # CPU cross-process collectives go through gloo (jax's default for CPU; set explicitly).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=ARGS.coordinator,
                             num_processes=ARGS.num_processes, process_id=ARGS.process_id,
                             initialization_timeout=300)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import flax  # noqa: E402

from configs import tiny  # noqa: E402
from focus_detr_jax.models.focus_detr import FocusDETR, init_variables  # noqa: E402
from focus_detr_jax.train import (checkpointing, optim, sharding, state as state_lib,  # noqa
                                  steps)
from focus_detr_jax.train.objective import Objective, model_loss  # noqa: E402


def make_config(canvas):
  config = tiny.get_config()
  config.data.canvases = ((canvas, canvas),)
  return config


def make_global_batch(step, batch_size, canvas, config):
  """Deterministic numpy batch of `batch_size` images (valid sizes vary, 1-3 boxes each)."""
  rng = np.random.default_rng(1000 + step)
  m, c = config.data.max_boxes, config.model.num_classes
  images = np.zeros((batch_size, canvas, canvas, 3), np.float32)
  pixel_valid = np.zeros((batch_size, canvas, canvas), bool)
  boxes = np.zeros((batch_size, m, 4), np.float32)
  labels = np.zeros((batch_size, m), np.int32)
  valid = np.zeros((batch_size, m), bool)
  sizes = np.zeros((batch_size, 2), np.int32)
  for i in range(batch_size):
    h = int(rng.integers(canvas // 2, canvas + 1))
    w = int(rng.integers(canvas // 2, canvas + 1))
    images[i, :h, :w] = rng.normal(size=(h, w, 3))
    pixel_valid[i, :h, :w] = True
    n = int(rng.integers(1, 4))
    cxcy = rng.uniform(0.25, 0.75, size=(n, 2))
    wh = rng.uniform(0.1, 0.4, size=(n, 2))
    boxes[i, :n] = np.concatenate([cxcy, wh], axis=1)
    labels[i, :n] = rng.integers(0, c, size=n)
    valid[i, :n] = True
    sizes[i] = (h, w)
  return dict(image=images, pixel_valid=pixel_valid, boxes=boxes, labels=labels, box_valid=valid,
              image_size=sizes)


def local_slice(batch):
  """This process's contiguous share of the global batch (process i holds rows i*B/P...)."""
  p, n = jax.process_index(), jax.process_count()
  per = next(iter(batch.values())).shape[0] // n
  return {k: v[p * per:(p + 1) * per] for k, v in batch.items()}


class Setup:
  """Model, optimiser and the initial state of the tiny config (identical in every process)."""

  def __init__(self, canvas):
    self.config = make_config(canvas)
    self.model = FocusDETR.from_config(self.config.model)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))
    # Initialise on one local device; every process computes the same values.
    with jax.default_device(jax.local_devices()[0]):
      variables = init_variables(self.model, init_rng)
      optim_config = optim.OptimConfig.from_config(self.config.optim)
      self.tx, self.schedule = optim.make_optimizer(variables["params"], optim_config,
                                                    self.model.backbone)
      self.state = jax.device_get(state_lib.create_train_state(
          variables, self.tx, state_rng, ema=self.config.optim.ema_decay > 0))
    self.objective = Objective.from_config(self.config)

  def jit_train_step(self, mesh):
    """The train step jitted exactly as train/loop.py does (replicated state, sharded batch)."""
    return sharding.jit_data_parallel(
        functools.partial(steps.train_step, model=self.model, objective=self.objective,
                          tx=self.tx, schedule=self.schedule,
                          ema_decay=self.config.optim.ema_decay), mesh)

  def jit_probe(self, mesh):
    """The discrete choices of the step's forward pass (same key as the step): foreground
    top-k and OESM token selection per encoder layer, the decoder's top-k proposals, the
    denoising slots and every Hungarian matching."""
    def probe(state, batch):
      key = jax.random.fold_in(state.rng, state.step)
      capture = _CaptureIntermediates(self.model)
      _, aux = model_loss(capture, state.params, state.extra, batch, self.objective, key=key)
      out = {"match/" + name: getattr(aux["matching"], name)
             for name in aux["matching"]._fields}
      out["enc_topk_proposals"] = aux["outputs"]["enc_topk_proposals"]
      if aux["denoising"] is not None:
        out["dn_valid"] = aux["denoising"].dn_valid
      leaves, _ = jax.tree_util.tree_flatten_with_path(capture.intermediates)
      for path, value in leaves:
        if jnp.issubdtype(value.dtype, jnp.integer) or value.dtype == jnp.bool_:
          out["intermediates" + jax.tree_util.keystr(path)] = value
      return out
    return sharding.jit_data_parallel(probe, mesh)


class _CaptureIntermediates:
  """Stands in for the model inside `model_loss` and keeps its sown intermediates."""

  def __init__(self, model):
    self.model = model
    self.num_levels = model.num_levels
    self.intermediates = None

  def apply(self, *args, **kwargs):
    outputs, state = self.model.apply(*args, mutable=["intermediates"], **kwargs)
    self.intermediates = state["intermediates"]
    return outputs


def flat_params(params):
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def host(tree):
  """Fully replicated (possibly multi-process) arrays -> numpy."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), tree)


def save_tree(path, tree):
  np.savez(path, **{f"{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(tree))})


def train_steps(setup, mesh, state, train_step, args, record, out, checkpointer=None):
  """Steps state.step+1 .. args.steps on the global batches (this process feeds its slice)."""
  tag = f"p{jax.process_index()}"
  for step in range(int(host(state.step)), args.steps):
    local = local_slice(make_global_batch(step, args.batch, args.canvas, setup.config))
    batch = sharding.global_batch(local, mesh)
    record["batch_shapes"][step + 1] = dict(local=list(local["image"].shape),
                                            global_=list(batch["image"].shape))
    t = time.time()
    state, metrics = train_step(state, batch)
    metrics = host(metrics)
    assert bool(metrics["finite"])
    record["losses"][step + 1] = float(metrics["total_loss"])
    print(f"{tag} step {step + 1}: loss {float(metrics['total_loss']):.7f} "
          f"({time.time() - t:.1f}s)", flush=True)
    if args.save_at and step + 1 == args.save_at:
      checkpointer.save(step + 1, state)
      checkpointer.wait()
      h = host(state)
      np.savez(out / f"params_step{step + 1}_{tag}.npz", **flat_params(h.params))
      save_tree(out / f"opt_step{step + 1}_{tag}.npz", h.opt_state)
  return state


def run_reference(args):
  setup = Setup(args.canvas)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  batch_np = make_global_batch(0, args.batch, args.canvas, setup.config)
  arrays = {f"init/param/{k}": v for k, v in flat_params(setup.state.params).items()}
  for name, devices in (("one", jax.devices()[:1]), ("all", jax.devices())):
    mesh = sharding.make_mesh(devices)
    sharding.check_batch_size(args.batch, mesh, setup.config.model.batch_group_size)
    state = jax.device_put(setup.state, sharding.replicated(mesh))
    batch = sharding.global_batch(batch_np, mesh)
    t = time.time()
    train_step = setup.jit_train_step(mesh)
    new_state, metrics = train_step(state, batch)
    probe = setup.jit_probe(mesh)(state, batch)
    jax.block_until_ready((new_state, probe))
    print(f"{name}: {len(devices)} devices, step + probe {time.time() - t:.1f}s", flush=True)
    h = host(dict(metrics=metrics, probe=probe, params=new_state.params,
                  opt=new_state.opt_state))
    arrays.update({f"{name}/metric/{k}": v for k, v in h["metrics"].items()})
    arrays.update({f"{name}/probe/{k}": v for k, v in h["probe"].items()})
    arrays.update({f"{name}/param/{k}": v for k, v in flat_params(h["params"]).items()})
    arrays.update({f"{name}/opt/{i}": v
                   for i, v in enumerate(jax.tree_util.tree_leaves(h["opt"]))})
  np.savez(out / "compare.npz", **arrays)

  # Continue on all devices from the step-1 state: the uninterrupted reference run.
  record = dict(num_devices=jax.device_count(), local_devices=jax.local_device_count(),
                process_count=jax.process_count(), lr=float(setup.config.optim.lr),
                losses={1: float(h["metrics"]["total_loss"])}, batch_shapes={})
  checkpointer = checkpointing.Checkpointer(args.ckpt_dir, keep=2) if args.ckpt_dir else None
  if args.save_at == 1:
    checkpointer.save(1, new_state)
    checkpointer.wait()
    np.savez(out / "params_step1_p0.npz", **flat_params(h["params"]))
    save_tree(out / "opt_step1_p0.npz", h["opt"])
  state = train_steps(setup, mesh, new_state, train_step, args, record, out, checkpointer)
  if checkpointer is not None:
    checkpointer.close()
  np.savez(out / "params_final_p0.npz", **flat_params(host(state.params)))
  (out / "record_p0.json").write_text(json.dumps(record))


def run_train(args):
  setup = Setup(args.canvas)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(args.batch, mesh, setup.config.model.batch_group_size)
  state = jax.device_put(setup.state, sharding.replicated(mesh))
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  tag = f"p{jax.process_index()}"
  checkpointer = checkpointing.Checkpointer(args.ckpt_dir, keep=2) if args.ckpt_dir else None
  record = dict(num_devices=jax.device_count(), local_devices=jax.local_device_count(),
                process_count=jax.process_count(), losses={}, batch_shapes={})
  if args.restore:
    step0 = checkpointer.latest_step()
    state = checkpointer.restore(state)
    h = host(state)
    assert int(h.step) == step0, (int(h.step), step0)
    leaf = jax.tree_util.tree_leaves(state.params)[0]
    record["restored_step"] = step0
    record["restored_sharding"] = dict(spec=str(leaf.sharding.spec),
                                       num_devices=len(leaf.sharding.device_set),
                                       mesh_shape=dict(leaf.sharding.mesh.shape))
    np.savez(out / f"restored_params_{tag}.npz", **flat_params(h.params))
    save_tree(out / f"restored_opt_{tag}.npz", h.opt_state)
    record["restored_rng"] = np.asarray(h.rng).tolist()
  record["initial_rng"] = np.asarray(setup.state.rng).tolist()
  state = train_steps(setup, mesh, state, setup.jit_train_step(mesh), args, record, out,
                      checkpointer)
  if checkpointer is not None:
    checkpointer.wait()
    checkpointer.close()
  np.savez(out / f"params_final_{tag}.npz", **flat_params(host(state.params)))
  (out / f"record_{tag}.json").write_text(json.dumps(record))


if __name__ == "__main__":
  {"reference": run_reference, "train": run_train}[ARGS.mode](ARGS)
  if ARGS.num_processes > 1:
    jax.distributed.shutdown()
