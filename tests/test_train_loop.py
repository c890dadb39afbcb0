"""The training loop end to end (subprocesses): config errors, preemption, exact resume,
non-finite losses, and the evaluation hook against pycocotools."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "scripts" / "train.py"), "--config", str(REPO / "configs" /
                                                                               "tiny.py")]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  e["PYTHONPATH"] = str(REPO)
  e["TF_CPP_MIN_LOG_LEVEL"] = "2"
  # Every launch compiles the same tiny programs: share them through the persistent cache.
  e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return e


def _losses(workdir):
  """Last logged total loss per step (a resumed run logs its replayed steps again)."""
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out[record["step"]] = record["total_loss"]
  return out


def _wait_for(predicate, proc, timeout=600):
  start = time.time()
  while time.time() - start < timeout:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.5)
  return False


def test_wrong_config_key_fails_before_compiling(env, tmp_path):
  start = time.time()
  proc = subprocess.run(TRAIN + ["--workdir", str(tmp_path), "--config.train.num_stepz=3"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "num_stepz" in proc.stderr
  assert not (tmp_path / "checkpoints").exists()
  assert time.time() - start < 120


@pytest.fixture(scope="module")
def uninterrupted_workdir(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  subprocess.run(TRAIN + ["--workdir", str(workdir), "--no_eval"], env=env, check=True,
                 capture_output=True, timeout=900)
  return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_workdir):
  return _losses(uninterrupted_workdir)


def test_sigterm_then_sigkill_then_resume_matches_uninterrupted(env, tmp_path, uninterrupted):
  assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]
  workdir = tmp_path / "run"
  metrics = workdir / "metrics.jsonl"
  cmd = TRAIN + ["--workdir", str(workdir), "--no_eval", "--config.train.checkpoint_every=2"]

  # 1. SIGTERM after the first logged step: the run saves where it is and exits cleanly.
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  assert _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 6, steps
  from focus_detr_jax.train import checkpointing
  restored = checkpointing.Checkpointer(workdir).latest.restore(steps[-1])
  assert int(restored["state"]["step"]) == steps[-1]

  # 2. Resume, then SIGKILL once step 5 is logged (a checkpoint at step 4 exists).
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  assert _wait_for(lambda: 5 in _losses(workdir), proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)

  # 3. Resume to the end: every step's loss equals the uninterrupted run's, bit for bit.
  subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
  resumed = _losses(workdir)
  assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):
    assert resumed[step] == uninterrupted[step], (step, resumed[step], uninterrupted[step])

  # 4. The finished run leaves its final parameters as a model checkpoint (predict's input).
  import jax
  from focus_detr_jax.checkpoint import load_model_checkpoint
  variables, saved_config = load_model_checkpoint(workdir / "model")
  assert saved_config.name == "tiny"
  final = checkpointing.Checkpointer(workdir).latest.restore(6)["state"]["params"]
  saved, expected = jax.tree_util.tree_leaves(variables["params"]), jax.tree_util.tree_leaves(final)
  assert len(saved) == len(expected) > 0
  for a, b in zip(saved, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _truncate_largest_file(step_dir):
  largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[:1000])


def _truncate_every_data_file(step_dir):
  """Parameters included: prediction reads only the parameters of a step, and they need not
  sit in the largest file."""
  for path in step_dir.rglob("*"):
    if path.is_file() and path.stat().st_size > 1000:
      path.write_bytes(path.read_bytes()[:1000])


def test_corrupt_newest_checkpoint_resume_and_predict_fall_back(env, tmp_path,
                                                                 uninterrupted_workdir,
                                                                 uninterrupted):
  """One truncated file in the newest checkpoint: predict and resume use the newest one that
  restores, say which step they skipped and why, and keep the bad one (training moves it to
  checkpoints_unrestorable/); with none restorable, predict ends with one `error:` line."""
  import shutil
  from focus_detr_jax import inference
  workdir = tmp_path / "run"
  shutil.copytree(uninterrupted_workdir, workdir)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [2, 4, 6]
  _truncate_largest_file(workdir / "checkpoints" / "6")

  # What predict/evaluate load with --workdir (the same call; nothing to compile here).
  inference.resolve_config(None, workdir)
  _, step = inference.load_variables(workdir)
  assert step == 4 and (workdir / "checkpoints" / "6").exists()

  # Resume: from step 4, steps 5 and 6 replay the uninterrupted run's losses exactly. The
  # backbone file named here does not exist: a resumed run does not read it.
  proc = subprocess.run(TRAIN + ["--workdir", str(workdir), "--no_eval",
                                 "--config.train.num_steps=7",
                                 f"--config.init.backbone={tmp_path / 'absent' / 'r50_v1.pkl'}"],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoints/6 cannot be restored, skipped" in proc.stderr
  assert "restored step 4 instead of the newest checkpoint" in proc.stderr
  assert (workdir / "checkpoints_unrestorable" / "6" / "state").exists()
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 6, 7]
  resumed = _losses(workdir)
  assert resumed[5] == uninterrupted[5] and resumed[6] == uninterrupted[6]
  assert sum(" | loss " in line for line in proc.stderr.splitlines()) == 3   # steps 5, 6, 7

  # Nothing restorable: one line, no traceback, within seconds.
  for step in (4, 6, 7):
    _truncate_every_data_file(workdir / "checkpoints" / str(step))
  predict = [sys.executable, str(REPO / "scripts" / "predict.py"), f"--workdir={workdir}",
             "--split=validation", f"--output_dir={tmp_path / 'out'}"]
  proc = subprocess.run(predict, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: no checkpoint in") and "step 7: " in last, last


def test_non_finite_loss_stops_with_step_and_checkpoint(tiny_config, tmp_path, monkeypatch):
  from focus_detr_jax.data import iterators
  from focus_detr_jax.train import loop
  real = iterators.make_train_iterator

  def poisoned(*args, **kwargs):
    it = real(*args, **kwargs)

    class Poisoned:
      count = 0

      def __next__(self):
        batch = next(it)
        Poisoned.count += 1
        if Poisoned.count == 3:
          # Images travel as uint8 (normalised on device): poison the float boxes instead.
          batch = dict(batch, boxes=np.full_like(batch["boxes"], np.nan))
        return batch

      def __getattr__(self, name):      # save, restore, stats, ... of the real iterator
        return getattr(it, name)

      def __setattr__(self, name, value):  # e.g. the loop's `normalize_on_host = False`
        setattr(it, name, value)

    return Poisoned()

  monkeypatch.setattr(iterators, "make_train_iterator", poisoned)
  config = tiny_config.copy_and_resolve_references()
  config.train.checkpoint_every = 2
  config.train.image_log_every = 2
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 3 .*checkpoints/2"):
    loop.train_and_evaluate(config, tmp_path, evaluate=False)

  # The good steps logged TensorBoard pictures of detections and selected tokens (step 2).
  import tensorflow as tf
  tags = set()
  for events in tmp_path.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(events)):
      tags |= {(event.step, v.tag) for v in event.summary.value}
  assert {(2, "images/detections"), (2, "images/token_selection")} <= tags, sorted(tags)


def test_sigterm_during_startup_and_after_the_last_step(tiny_config, tmp_path, monkeypatch):
  """SIGTERM is caught from the start: during start-up the run stops after its first step with a
  checkpoint; after the last step the final model is still written and only the final evaluation
  is skipped."""
  from focus_detr_jax.evaluation.evaluator import Evaluator
  from focus_detr_jax.train import loop
  real_init, real_save_model = loop.init_variables, loop.save_model_checkpoint

  def init_then_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)       # before restore, data and compilation
    return real_init(*args, **kwargs)

  monkeypatch.setattr(loop, "init_variables", init_then_sigterm)
  config = tiny_config.copy_and_resolve_references()
  config.train.num_steps = 3
  config.train.checkpoint_every = 100
  config.train.image_log_every = 0
  result = loop.train_and_evaluate(config, tmp_path, evaluate=False)
  assert result["preempted"] and result["sigterm"] and result["step"] == 1, result["step"]
  steps = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
  assert steps == [1]
  assert not (tmp_path / loop.MODEL_DIR).exists()   # stopped early: no final model

  # Resume with nothing left to train; the SIGTERM arrives during the final model export.
  def save_model_then_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_save_model(*args, **kwargs)

  evaluations = []
  monkeypatch.setattr(loop, "init_variables", real_init)
  monkeypatch.setattr(loop, "save_model_checkpoint", save_model_then_sigterm)
  monkeypatch.setattr(Evaluator, "run", lambda self, *a, **k: evaluations.append(1) or {"AP": 0})
  config.train.num_steps = 1
  result = loop.train_and_evaluate(config, tmp_path, evaluate=True)
  assert result["step"] == 1 and not result["preempted"] and result["sigterm"]
  assert (tmp_path / loop.MODEL_DIR).exists()
  assert evaluations == []

  # Without a SIGTERM the same resume evaluates (the skip above is the signal's doing).
  monkeypatch.setattr(loop, "save_model_checkpoint", real_save_model)
  result = loop.train_and_evaluate(config, tmp_path, evaluate=True)
  assert not result["sigterm"] and evaluations == [1]


def test_eval_hook_equals_pycocotools(tiny_config, tiny_model_and_variables, tmp_path):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  from focus_detr_jax.data.datasets import DataConfig
  from focus_detr_jax.evaluation.evaluator import Evaluator
  model, variables = tiny_model_and_variables
  evaluator = Evaluator(model, DataConfig.from_config(tiny_config), tiny_config.model.num_select,
                        tmp_path)
  metrics = evaluator.run(variables, step=0)
  detections = json.loads((tmp_path / "eval" / "step_0_detections.json").read_text())
  assert detections and all(d["category_id"] in {c["id"] for c in
                                                 evaluator.ground_truth["categories"]}
                            for d in detections)
  gt_path = tmp_path / "gt.json"
  gt_path.write_text(json.dumps(evaluator.ground_truth))
  gt = COCO(str(gt_path))
  ev = COCOeval(gt, gt.loadRes(str(tmp_path / "eval" / "step_0_detections.json")), "bbox")
  ev.evaluate()
  ev.accumulate()
  ev.summarize()
  for i, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
    assert metrics[name] == pytest.approx(ev.stats[i], abs=1e-12), name
  # Every eval image was predicted exactly once.
  assert {d["image_id"] for d in detections} == {im["id"] for im in
                                                evaluator.ground_truth["images"]}


def test_workdir_paths_local_absolute_and_urls_untouched(tmp_path, monkeypatch):
  from focus_detr_jax.checkpoint import as_path
  monkeypatch.chdir(tmp_path)
  assert str(as_path("runs/a")) == str(tmp_path / "runs" / "a")
  assert str(as_path("gs://bucket/runs/a") / "checkpoints") == "gs://bucket/runs/a/checkpoints"
