"""The reproducibility kit: the in-repo R50 set, the recorder's torch-free parts, set diffs.

The recorder itself needs detrex (an optional environment, docs/reproducibility.md); what it
shares with this environment is checked here: the input draws, the weight rule via the manifest,
and the set layout that check_parity reads.
"""

import json

import numpy as np
import pytest

from conftest import PARITY_ROOT, R50_COMPACT, full_set_available, import_script
from focus_detr_jax.reference import diff, recorder

FILES = ("inputs.npz", "forward_eval.npz", "losses_train.npz", "foreground_labels.npz",
         "ms_deform_attn.npz", "dn_train.npz", "grads_train.npz", "grads_train_dn.npz",
         "meta.json", "state_dict_manifest.json", "training_meta.json")


def test_in_repo_set_is_complete_and_small():
  sizes = {f: (R50_COMPACT / f).stat().st_size for f in FILES}
  assert sum(sizes.values()) < 14e6, sizes
  meta = json.loads((R50_COMPACT / "meta.json").read_text())
  assert meta["config"].endswith("focus_detr_r50_4scale_12ep.py")
  assert meta["weights"]["source"] == "rule"
  assert set(meta["parts"]) == set(recorder.PARTS)


def test_in_repo_inputs_are_the_recorders_draws():
  """inputs.npz holds exactly what make_inputs draws for the set's seed and sizes."""
  with np.load(R50_COMPACT / "inputs.npz") as z:
    stored = {k: z[k] for k in z.files}
  seed = int(stored["seed"])
  again = recorder.make_inputs(seed, [tuple(s) for s in stored["image_sizes"]],
                               [tuple(s) for s in stored["train_image_sizes"]])
  for key, value in again.items():
    np.testing.assert_array_equal(stored[key], value, err_msg=key)


def test_seed0_draws_reproduce_the_public_images():
  if not full_set_available("public"):
    pytest.skip(f"full parity sets not found at {PARITY_ROOT}")
  with np.load(PARITY_ROOT / "public" / "inputs.npz") as z:
    public = {k: z[k] for k in z.files}
  again = recorder.make_inputs(0, [tuple(s) for s in public["image_sizes"]])
  for key in ("image_0", "image_1", "train_image_0", "train_image_1"):
    np.testing.assert_array_equal(again[key], public[key], err_msg=key)


def test_r50_manifest_is_shared():
  """Every R50 set has the same state_dict manifest (the in-repo one equals public's)."""
  if not full_set_available("public"):
    pytest.skip(f"full parity sets not found at {PARITY_ROOT}")
  ours = json.loads((R50_COMPACT / "state_dict_manifest.json").read_text())
  public = json.loads((PARITY_ROOT / "public" / "state_dict_manifest.json").read_text())
  assert ours == public


def test_diff_of_a_set_with_itself_is_bitwise(tmp_path):
  report = diff.diff_sets(R50_COMPACT, R50_COMPACT)
  for name, entries in report.items():
    if name.endswith(".npz"):
      assert all(v["equal"] for k, v in entries.items() if not k.startswith("_")), name
  lines = diff.summary_lines(report)
  assert any("forward_eval.npz" in line and "bitwise equal" in line for line in lines)


def test_recorder_asks_for_detrex_projects_on_the_path(monkeypatch, tmp_path):
  """detrex's configs import its projects/ folder, which detrex's install leaves out: without it
  on PYTHONPATH the recorder says so (the checkout is never added to sys.path behind the user)."""
  monkeypatch.chdir(tmp_path)   # no projects/ folder in the working directory
  with pytest.raises(RuntimeError, match="PYTHONPATH"):
    recorder.build_model("projects/focus_detr/configs/x.py", detrex_root=tmp_path)


def test_record_script_reports_a_missing_detrex_in_one_line(monkeypatch, tmp_path, capsys):

  def record(*args, **kwargs):
    return recorder.build_model("projects/focus_detr/configs/x.py", kwargs["detrex_root"])

  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(recorder, "configure_cpu", lambda *a: None)   # no torch here
  monkeypatch.setattr(recorder, "record", record)
  script = import_script("record_reference")
  assert script.main(["--out", str(tmp_path / "set"), "--detrex-root", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "PYTHONPATH" in err[0]
