"""Training checkpoints with orbax: async saves, the last k and the best AP, exact resume.

Layout of a workdir:
  checkpoints/<step>/state       TrainState (params, optimiser, step, RNG, EMA)
  best/<step>/state              the same for the best evaluation AP (kept: 1)
  input/<step>/host<i>.*         the input iterator position of host i at that step
Restoring takes the target shardings, so a run can resume on a different mesh.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from focus_detr_jax.checkpoint import as_path


class Checkpointer:
  """Latest-k and best-AP checkpoint managers over one workdir."""

  def __init__(self, workdir, keep: int = 3, async_save: bool = True):
    self.workdir = as_path(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.latest = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)
    best_options = ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=async_save,
        best_fn=lambda metrics: metrics["AP"], best_mode="max")
    self.best = ocp.CheckpointManager(self.workdir / "best", options=best_options)

  def input_prefix(self, step: int) -> epath.Path:
    return self.workdir / "input" / str(step) / f"host{jax.process_index()}"

  def save(self, step: int, state, data_iterator=None, metrics=None, best: bool = False):
    """Save `state` (async) and this host's input position (synchronously, small)."""
    if data_iterator is not None:
      prefix = self.input_prefix(step)
      prefix.parent.mkdir(parents=True, exist_ok=True)
      data_iterator.save(str(prefix))
    manager = self.best if best else self.latest
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                 metrics=metrics, force=True)
    self._prune_inputs()

  def _prune_inputs(self):
    """Drop input positions of steps no manager keeps any more."""
    root = self.workdir / "input"
    if not root.exists() or jax.process_index() != 0:
      return
    keep = set(self.latest.all_steps()) | set(self.best.all_steps())
    for d in root.iterdir():
      if d.name.isdigit() and int(d.name) not in keep and int(d.name) < max(keep | {0}):
        d.rmtree()

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def restore(self, target_state, data_iterator=None, step: Optional[int] = None):
    """Restore the latest (or given) step onto `target_state`'s structure and shardings."""
    step = self.latest.latest_step() if step is None else step
    if step is None:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_state)
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    if data_iterator is not None:
      data_iterator.restore(str(self.input_prefix(step)))
    return restored["state"]

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()
