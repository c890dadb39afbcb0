"""Parity at a full COCO evaluation size: the partial `public_800x1067` set (decisions §8).

One R50 image at 800x1067 (level 1 is 50 rows high, so the last row's proposals sit exactly on
the `< 0.99` bound, the first row's on `> 0.01`). The directory is partial: absent arrays are
listed as skipped, everything present is compared. Needs the workspace's shared/parity (or
FOCUS_DETR_PARITY_ROOT); a fresh clone skips it with that reason. One eval program at full size
(plus its float64 twin when the decoder rows need the arbitration), compiled once per module.
"""

import pytest

from conftest import PARITY_ROOT, full_set_available
from focus_detr_jax.parity.forward_stages import eval_stages
from focus_detr_jax.parity.reference import config_for_reference, load_reference

SET = PARITY_ROOT / "public_800x1067"
pytestmark = pytest.mark.skipif(not full_set_available("public_800x1067"),
                                reason=f"full parity set not found at {SET}")

DECODER_ROWS = ("eval/pred_logits", "eval/pred_boxes", "eval/infer_img0", "eval/det_img0")


@pytest.fixture(scope="module")
def results():
  reference = load_reference(SET)
  config = config_for_reference(reference["meta"])
  skipped = []
  rows = eval_stages(reference, config, skipped)
  return rows, skipped


def test_partial_directory_runs_what_it_holds(results):
  rows, skipped = results
  names = {r.stage for r in rows}
  assert "eval/enc_output_proposals_valid" in names
  assert all(f"eval/fg_inds_layer{l}" in names for l in range(6))
  # The arrays this set leaves out are listed, not errors.
  assert any("oesm_score_tgt_max_layer0" in s for s in skipped)
  assert any("eval/memory " in s or s.startswith("eval/memory (") for s in skipped)


def test_every_stage_before_the_decoder_passes(results):
  """The proposal bound (65 tokens of level 1 before the fix), the foreground scores, every
  cascade/OESM/top-900 index set, the encoder outputs and the decoder's inputs."""
  rows, _ = results
  upstream = [r for r in rows if not r.stage.startswith(DECODER_ROWS)]
  assert len(upstream) >= 40
  failed = [r.row() for r in upstream if not r.passed]
  assert not failed, "\n".join(failed)


@pytest.mark.xfail(strict=True, reason=(
    "decoder outputs at 800x1067 miss atol 5e-3 even under the float64 arbitration: the recorded "
    "float32 logits are themselves 4.3e-2 from the float64 computation (our float32: 8.6e-2, "
    "p99 5.3e-3); the error grows ~4x per decoder layer on a few tiny-box queries (PARITY.md)"))
def test_decoder_outputs_pass_or_pass_under_float64_arbitration(results):
  rows, _ = results
  decoder = [r for r in rows if r.stage.startswith(DECODER_ROWS)]
  assert decoder
  failed = [r.row() for r in decoder if not r.passed]
  assert not failed, "\n".join(failed)
