"""Parity with the official detrex implementation on the recorded R50 sets (decisions §8).

Runs on the compact R50 set in the repository (tests/data/parity/r50_compact, recorded with
scripts/record_reference.py) and, when the workspace's shared/parity (or FOCUS_DETR_PARITY_ROOT)
is present, on the full `public` set too. The R50 programs (eval and train forward) compile once
per set (module fixtures); every stage row of scripts/check_parity.py must pass at the contract's
tolerances.
"""

import jax
import numpy as np
import pytest

from conftest import r50_sets
from focus_detr_jax.parity import compare, diagnostics, forward_stages, loss_stages
from focus_detr_jax.parity.reference import (build_model, config_for_reference, forced_from,
                                             load_reference, make_batch, run_forward)
from focus_detr_jax.parity.weights import build_state_dict

SETS = r50_sets()


@pytest.fixture(scope="module", params=[d for _, d in SETS], ids=[n for n, _ in SETS])
def reference(request):
  return load_reference(request.param)


@pytest.fixture(scope="module")
def config(reference):
  return config_for_reference(reference["meta"])


def _assert_all_pass(results):
  assert results, "no stage ran"
  failed = [r.row() for r in results if not r.passed]
  assert not failed, "parity failures:\n" + "\n".join(failed)


def test_deformable_attention_function_and_module(reference):
  results = forward_stages.msda_stages(reference["ms_deform_attn"])
  assert [r.stage for r in results] == ["msda/function", "msda/module_ref2", "msda/module_ref4"]
  _assert_all_pass(results)


@pytest.fixture(scope="module")
def eval_results(reference, config):
  return forward_stages.eval_stages(reference, config)


@pytest.mark.parametrize("group", [
    "backbone", "neck", "pos_embed", "fg_score", "fg_inds", "oesm", "enc_layer", "memory",
    "enc_topk_proposals", "enc_pred", "pred_logits", "pred_boxes", "inter_references",
    "infer_img", "det_img", "token_nums"])
def test_eval_stage(eval_results, group):
  rows = [r for r in eval_results if group in r.stage]
  _assert_all_pass(rows)


def test_eval_stage_coverage(eval_results):
  names = {r.stage for r in eval_results}
  for l in range(6):
    assert f"eval/fg_inds_layer{l}" in names and f"eval/oesm_sel_local_layer{l}" in names
  assert len(eval_results) >= 80
  _assert_all_pass(eval_results)


@pytest.fixture(scope="module")
def train_forward(reference, config):
  return forward_stages.train_forward(reference, config)


def test_train_forward_stages(reference, config, train_forward):
  results = forward_stages.train_stages(reference, config, train_forward)
  assert any(r.stage == "train/padding_mask_lvl0" for r in results)
  _assert_all_pass(results)


def test_manifest_weights_match_fingerprint(reference):
  """The weight rule reproduces the recorded per-key sums (meta.json weight_fingerprint)."""
  sd = build_state_dict(reference["dir"] / "state_dict_manifest.json", reference["meta"]["seed"])
  fingerprint = reference["meta"]["weight_fingerprint"]
  assert set(fingerprint) == set(sd)
  for key, (total, abs_total) in fingerprint.items():
    arr = sd[key].astype(np.float64)
    assert np.isclose(arr.sum(), total, rtol=1e-9, atol=1e-9), key
    assert np.isclose(np.abs(arr).sum(), abs_total, rtol=1e-9, atol=1e-9), key


def test_criterion_on_stored_outputs(reference):
  _assert_all_pass(loss_stages.criterion_only_stages(reference["dir"]))


@pytest.mark.parametrize("with_dn", [False, True], ids=["dn_off", "dn_on"])
def test_training_losses_and_gradients(reference, config, with_dn):
  """All 40 loss terms, the 7 matchings, DN queries/outputs, and the gradients (issue 10)."""
  if with_dn:
    rows = loss_stages.dn_stages(reference, config)
    assert any("attn_mask" in r.stage for r in rows)
  else:
    rows = loss_stages.train_loss_stages(reference, config)
  rows += loss_stages.gradient_stages(reference, config, with_dn)
  grads = reference["grads_train_dn" if with_dn else "grads_train"]
  n_full = sum(k.startswith("grad__") for k in grads)
  assert n_full >= 8 and sum("/grad " in r.stage for r in rows) >= n_full
  _assert_all_pass(rows)


def _float64_end_to_end_rows(reference, config):
  """Our float64 model, every index forced, against a set without the full `memory` (compact)."""
  ref = reference["forward_eval"]
  images, pixel_valid, _ = make_batch(reference["inputs"])
  forced = forced_from(ref, config.model.num_encoder_layers)
  config64 = config.copy_and_resolve_references()
  config64.model.dtype = "float64"
  with jax.enable_x64(True):
    model64, variables64 = build_model(config64, reference["dir"], train=False)
    out64, inter64 = run_forward(model64, variables64, images.astype(np.float64), pixel_valid,
                                 False, forced)
  rownorm = np.linalg.norm(inter64["memory"], axis=-1)
  return {"end to end: |reference f32 - ours f64| memory_rownorm / rownorm":
              float(np.max(np.abs(rownorm - ref["memory_rownorm"]) / ref["memory_rownorm"])),
          **{f"end to end: |reference f32 - ours f64| {k}": float(np.abs(out64[k] - ref[k]).max())
             for k in ("pred_logits", "pred_boxes")}}


def test_float64_model_against_the_float32_reference(reference, config):
  """`check_parity.py --dtype float64 / --sensitivity`: our float64 model (the exactly computed
  output) is within the contract's tolerances of the float32 reference on this set, and it is
  not the float32 program (the decoder-alone rows differ from zero)."""
  if "memory" not in reference["forward_eval"]:  # compact set: end to end only
    rows = _float64_end_to_end_rows(reference, config)
    assert rows["end to end: |reference f32 - ours f64| memory_rownorm / rownorm"] <= 1e-4, rows
    assert 0 < rows["end to end: |reference f32 - ours f64| pred_logits"] <= compare.TOL_DEC_LOGITS
    assert rows["end to end: |reference f32 - ours f64| pred_boxes"] <= compare.TOL_DEC_BOXES, rows
    return
  rows = dict(diagnostics.float64_rounding_rows(reference, config))
  assert rows["end to end: |reference f32 - ours f64| memory"] <= compare.TOL_MEMORY, rows
  assert rows["end to end: |reference f32 - ours f64| pred_logits"] <= compare.TOL_DEC_LOGITS, rows
  assert rows["end to end: |reference f32 - ours f64| pred_boxes"] <= compare.TOL_DEC_BOXES, rows
  assert rows["memory forced: |ours f32 - ours f64| pred_logits"] > 0, rows
