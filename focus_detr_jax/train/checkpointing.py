"""Training checkpoints with orbax: async saves, the last k and the best AP, exact resume.

Layout of a workdir:
  checkpoints/<step>/state       TrainState (params, optimiser, step, RNG, EMA)
  best/<step>/state              the same for the best evaluation AP (kept: 1)
  input/<step>/host<i>.*         the input iterator position of host i at that step
Restoring takes the target shardings, so a run can resume on a different mesh. A step that does
not restore (a truncated file) is skipped for the next older one; training then moves it to
`checkpoints_unrestorable/<step>` (kept for inspection, never deleted).
"""

import logging
from typing import List, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from focus_detr_jax.checkpoint import CheckpointError, as_path, restore_newest
from focus_detr_jax.config_check import ConfigMismatchError, describe_shape_mismatch


UNRESTORABLE_DIR = "checkpoints_unrestorable"


def shape_mismatches(stored, target) -> List[Tuple[str, tuple, tuple]]:
  """(path, stored shape, target shape) of every array whose shape differs, and of arrays that
  only one of the two trees has (shape `()` stands for "absent")."""
  def shapes(tree):
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(getattr(v, "shape", ()))
            for p, v in flat if hasattr(v, "shape")}
  a, b = shapes(stored), shapes(target)
  out = [(k, a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
  out += [(f"{k} (only in the checkpoint)", a[k], ()) for k in sorted(a.keys() - b.keys())]
  out += [(f"{k} (not in the checkpoint)", (), b[k]) for k in sorted(b.keys() - a.keys())]
  return out


class Checkpointer:
  """Latest-k and best-AP checkpoint managers over one workdir.

  `model_config` (optional) only improves the message of a shape mismatch.
  """

  def __init__(self, workdir, keep: int = 3, async_save: bool = True, model_config=None):
    self.workdir = as_path(workdir)
    self.model_config = model_config
    self.skipped: List[Tuple[int, str]] = []
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
    """Restore onto `target_state`'s structure and shardings: the given step, else the newest
    step that restores.

    A step that fails to restore (a truncated or missing file) is skipped with a warning and left
    on disk, and the next older one is tried; `self.skipped` lists the (step, reason) pairs.
    Parameters of other shapes than the target's raise `config_check.ConfigMismatchError` (a
    config problem, the same for every step); no restorable step raises `CheckpointError`.
    Returns None when there is no checkpoint at all.
    """
    steps = [step] if step is not None else sorted(self.latest.all_steps(), reverse=True)
    if not steps:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target_state)
    self.skipped = []
    state, self.skipped = restore_newest(
        self.latest.directory, steps, lambda s: self._restore_step(s, abstract, data_iterator),
        keep_raising=(ConfigMismatchError,))
    return state

  def _restore_step(self, step: int, abstract, data_iterator):
    """The state of one step, after checking its stored shapes against `abstract`'s."""
    stored = ocp.StandardCheckpointHandler().metadata(self.latest.directory / str(step) / "state")
    mismatches = shape_mismatches(stored, abstract)
    if mismatches:
      raise ConfigMismatchError(describe_shape_mismatch(mismatches, self.model_config,
                                                        self.workdir))
    restored = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    if data_iterator is not None:
      data_iterator.restore(str(self.input_prefix(step)))
    return restored["state"]

  def set_aside(self, steps) -> None:
    """Move unrestorable step directories to `checkpoints_unrestorable/` (never deleted), so
    that new saves of those step numbers do not collide with them. Process 0 moves; every
    process reloads its step list."""
    if jax.process_count() > 1:   # every process is done reading before anything moves
      multihost_utils.sync_global_devices("checkpointing.set_aside.before")
    if jax.process_index() == 0:
      for step in steps:
        source = self.latest.directory / str(step)
        target = self.workdir / UNRESTORABLE_DIR / str(step)
        if source.exists():
          target.parent.mkdir(parents=True, exist_ok=True)
          if target.exists():
            target = target.parent / f"{step}.{len(list(target.parent.iterdir()))}"
          source.rename(target)
          logging.warning("moved the unrestorable checkpoint %s to %s", source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpointing.set_aside.after")
    self.latest.reload()

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()
