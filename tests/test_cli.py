"""The edges a user touches first, run as a user runs them (subprocesses, nothing compiles):
`--help`, config overrides of optional fields, one-line errors without tracebacks, config
checks before anything is written, and a workdir whose checkpoint another model config wrote."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in (REPO / "scripts").glob("*.py"))
TINY = str(REPO / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def env():
  e = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
  e.pop("FOCUS_DETR_DEBUG", None)
  return e


def _script(name, *args):
  return [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args]


def _run(cmd, env, timeout=120):
  start = time.time()
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  return proc, time.time() - start


def _assert_one_line_error(proc, *expected):
  """Non-zero exit, stderr ends with `error: ...` naming `expected`, no traceback."""
  assert proc.returncode != 0, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), proc.stderr[-2000:]
  for text in expected:
    assert text in last, last
  return last


def test_help_of_every_script_exits_zero(env):
  procs = {name: subprocess.Popen(_script(name, "--help"), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for name in SCRIPTS}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, (name, err[-2000:])
    assert "--" in out and "Traceback" not in err, (name, out[:500], err[-1000:])


def test_every_config_field_is_typed_so_it_can_be_overridden():
  """A None default cannot be overridden from the command line: optional fields are typed
  placeholders (`ml_collections.config_dict.placeholder`)."""
  import importlib
  import ml_collections

  def none_fields(c, prefix=""):
    for k, v in c.items():
      if isinstance(v, ml_collections.ConfigDict):
        yield from none_fields(v, f"{prefix}{k}.")
      elif v is None and c.get_type(k) is type(None):
        yield prefix + k
  for path in sorted((REPO / "configs").glob("*.py")):
    if path.stem in ("__init__", "common", "swin"):
      continue
    config = importlib.import_module(f"configs.{path.stem}").get_config()
    assert not list(none_fields(config)), path.stem


def test_optional_fields_override_with_their_type():
  from absl import flags
  from focus_detr_jax import cli
  argv = ["x", f"--config={TINY}", "--config.data.data_dir=/data/tfds",
          "--config.data.eval_canvases=((128, 160),)", "--config.data.canvas_weights=(1.0,)"]
  fv = flags.FlagValues()
  cli.define_config(fv, argv, required=True)
  assert cli._parse(fv, argv) == []   # pylint: disable=protected-access
  assert fv.config.data.data_dir == "/data/tfds"
  assert tuple(map(tuple, fv.config.data.eval_canvases)) == ((128, 160),)
  assert tuple(fv.config.data.canvas_weights) == (1.0,)


@pytest.mark.parametrize("args,expected,status", [
    (["--config.train.max_minutse=1"],
     ("unknown config key config.train.max_minutse", "config.train.max_minutes"), 2),
    (["--config.data.batch_size=3"], ("config.data.batch_size=3", "batch_group_size=2"), 1),
    (["--config.data.batch_size=abc"], ("--config.data.batch_size=abc",), 2),
    (["--config.data.data_dir=/nowhere", "--config.data.batch_size=0"], ("must be positive",), 1),
    (["--config.init.backbone=/nowhere/R-50.pkl"],
     ("config.init.backbone=/nowhere/R-50.pkl does not exist",), 1),
], ids=["misspelled_key", "batch_vs_group", "wrong_type", "data_dir_override_then_bad_batch",
        "missing_backbone_file"])
def test_train_config_errors_are_one_line_and_write_nothing(env, tmp_path, args, expected,
                                                              status):
  workdir = tmp_path / "run"
  proc, seconds = _run(_script("train", f"--config={TINY}", f"--workdir={workdir}", *args), env)
  _assert_one_line_error(proc, *expected)
  assert proc.returncode == status
  assert not workdir.exists()
  assert seconds < 60


def test_batch_that_does_not_split_over_the_devices(env, tmp_path):
  env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc, _ = _run(_script("train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}",
                         "--config.data.batch_size=6"), env)
  _assert_one_line_error(proc, "does not split over the 4 devices", "multiple of 8")
  assert not (tmp_path / "run").exists()


def test_missing_config_file_and_missing_flags(env, tmp_path):
  proc, seconds = _run(_script("train", "--config=configs/nope.py", f"--workdir={tmp_path}/r"),
                       env)
  _assert_one_line_error(proc, "cannot load --config", "nope.py")
  assert proc.returncode == 2 and seconds < 30 and not (tmp_path / "r").exists()
  proc, _ = _run(_script("train", f"--config={TINY}"), env)
  _assert_one_line_error(proc, "--workdir")
  proc, _ = _run(_script("predict", "--workdir=/x", "--inputs=a.jpg", "--output_dir=/tmp/o",
                         "--max_images=-1"), env)
  _assert_one_line_error(proc, "--max_images=-1")
  assert proc.returncode == 2
  proc, _ = _run(_script("evaluate", f"--checkpoint={tmp_path / 'absent'}"), env)
  _assert_one_line_error(proc, "does not exist")
  proc, _ = _run(_script("train", f"--config={TINY}", f"--workdir={tmp_path}/r",
                         "--config.data.batch_size=3", "--debug"), env)
  assert proc.returncode != 0 and "Traceback" in proc.stderr   # --debug keeps the traceback


@pytest.fixture
def workdir_of_another_model(tmp_path):
  """A workdir that trained the tiny config (its config.json and a checkpoint step)."""
  from configs import tiny
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "4" / "state").mkdir(parents=True)
  (workdir / "config.json").write_text(tiny.get_config().to_json_best_effort())
  return workdir


def test_resume_with_another_model_config_names_the_keys(env, workdir_of_another_model):
  workdir = workdir_of_another_model
  before = sorted(p.name for p in workdir.rglob("*"))
  proc, seconds = _run(_script("train", f"--config={TINY}", f"--workdir={workdir}",
                               "--config.model.hidden_dim=32", "--config.model.num_classes=5",
                               "--config.model.dtype=bfloat16"), env)
  last = _assert_one_line_error(proc, "model.hidden_dim is 32 here but 64",
                                "model.num_classes is 5 here but 4", "--config.init.checkpoint=")
  assert "dtype" not in last            # the compute dtype does not change the parameters
  assert seconds < 60
  assert sorted(p.name for p in workdir.rglob("*")) == before   # nothing written


def test_predict_and_evaluate_with_a_config_that_does_not_fit_the_workdir(
    env, workdir_of_another_model, tmp_path):
  workdir = workdir_of_another_model
  proc, _ = _run(_script("predict", f"--workdir={workdir}", f"--config={TINY}",
                         "--config.model.num_queries=50", f"--inputs={tmp_path}",
                         f"--output_dir={tmp_path / 'out'}"), env)
  _assert_one_line_error(proc, "model.num_queries is 50 here but 30")
  assert not (tmp_path / "out").exists()
  proc, _ = _run(_script("evaluate", f"--workdir={workdir}", f"--config={TINY}",
                         "--config.model.num_encoder_layers=3", "--config.model.cascade=(1,1,1)"),
                 env)
  _assert_one_line_error(proc, "model.num_encoder_layers is 3 here but 2")


def test_unreadable_images_are_named_plainly(tmp_path):
  from focus_detr_jax import inference
  from focus_detr_jax.data import coco_folder
  empty, text = tmp_path / "empty.jpg", tmp_path / "notes.png"
  empty.write_bytes(b"")
  text.write_text("not an image")
  for path, reason in ((empty, "empty file"), (text, "not an image file")):
    with pytest.raises(coco_folder.BadImage) as info:
      inference.read_image(path)
    assert reason in str(info.value) and "BytesIO" not in str(info.value)


def test_progress_line_and_eta_respect_the_time_budget():
  from focus_detr_jax.train import loop
  metrics = {"total_loss": 3.2, "loss_class": 0.4, "loss_bbox": 0.1, "loss_giou": 0.3,
             "select_loss": 0.2, "loss_class_0": 0.5, "grad_norm": 1.0, "finite": True}
  # 1900 steps left at 100/60 steps/s: 19 min, but only 10 min left of an 11-minute budget.
  summary = loop._summaries(metrics, 100 / 60, 1900, 60.0, max_minutes=11.0)  # pylint: disable=protected-access
  assert summary["eta_minutes"] == pytest.approx(10.0)
  assert loop._summaries(metrics, 100 / 60, 1900, 60.0)["eta_minutes"] == pytest.approx(19.0)  # pylint: disable=protected-access
  # The rate leaves out the first step (its compilation): 10 s, then 9 steps in 3 s.
  rate = loop._StepRate(start_time=0.0, start_step=0)  # pylint: disable=protected-access
  assert rate.update(1, 10.0) == pytest.approx(0.1)
  assert rate.update(10, 13.0) == pytest.approx(3.0)
  assert summary["loss_class_0"] == 0.5          # every term still goes to TensorBoard/jsonl
  line = loop.progress_line(100, 2000, summary, 60.0, max_minutes=11.0)
  assert line.startswith("step 100/2000 | loss 3.2 (cls 0.4 bbox 0.1 giou 0.3 select 0.2)")
  assert "10.0 min left" in line and "loss_class_0" not in line and "\n" not in line


def test_unknown_key_message_keeps_the_full_path():
  from focus_detr_jax import cli
  error = AttributeError("'max_minutse'\nDid you mean \"max_minutes\" instead of \"max_minutse\"?")
  message = cli._unknown_key_message(error, ["x", "--config.train.max_minutse=1"])  # pylint: disable=protected-access
  assert message == ("unknown config key config.train.max_minutse "
                     "(did you mean config.train.max_minutes?)")


def test_config_json_of_an_older_version_loads_with_new_defaults(tmp_path):
  from configs import tiny
  from focus_detr_jax.checkpoint import load_config
  saved = json.loads(tiny.get_config().to_json_best_effort())
  del saved["model"]["dtype"]                   # a key the code gained after the run
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = load_config(tmp_path)
  assert config.model.dtype == "float32" and config.model.hidden_dim == 64


def test_weight_file_with_object_arrays_is_one_line(env, tmp_path):
  import numpy as np
  np.savez(tmp_path / "weights.npz", conv1=np.array([{"not": "an array"}], dtype=object))
  proc, seconds = _run(_script("convert_checkpoint", "--format=torchvision", f"--config={TINY}",
                               str(tmp_path / "weights.npz"), str(tmp_path / "out")), env)
  _assert_one_line_error(proc, "weights.npz")
  assert proc.returncode == 1 and not (tmp_path / "out").exists() and seconds < 60


def test_unobserved_background_failures_leave_no_traceback(tmp_path):
  # What orbax/tensorstore leave behind a failed restore: an asyncio future whose exception
  # nobody retrieves (asyncio logs it with a traceback when it is collected).
  program = tmp_path / "prog.py"
  program.write_text(
      "import asyncio, gc, sys\n"
      "from focus_detr_jax import cli\n"
      "def run(fv, args):\n"
      "  cli.configure_logging()\n"
      "  loop = asyncio.new_event_loop()\n"
      "  future = loop.create_future()\n"
      "  try:\n"
      "    raise ValueError('OUT_OF_RANGE: unreadable shard')\n"
      "  except ValueError as e:\n"
      "    future.set_exception(e)\n"
      "  del future\n"
      "  gc.collect()\n"
      "  raise ValueError('no checkpoint can be restored')\n"
      "cli.exit_with(cli.main('prog', lambda fv, argv: None, run, sys.argv))\n")
  env = dict(os.environ, PYTHONPATH=str(REPO))
  quiet = subprocess.run([sys.executable, str(program)], env=env, capture_output=True, text=True,
                         timeout=120)
  assert quiet.returncode == 1 and "Traceback" not in quiet.stderr, quiet.stderr
  assert quiet.stderr.strip().splitlines()[-1].startswith("error: no checkpoint can be restored")
  loud = subprocess.run([sys.executable, str(program), "--debug"], env=env, capture_output=True,
                        text=True, timeout=120)
  # The filter is what hides it: with --debug asyncio's record and its traceback are printed.
  assert "Future exception was never retrieved" in loud.stderr and "unreadable shard" in loud.stderr
