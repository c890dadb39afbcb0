"""Comparison rules of the parity contract (decisions §8): tolerances and tie-aware index sets."""

import dataclasses
from typing import Optional

import numpy as np

# Tolerances of decisions.md §8 (never loosen).
TOL_MODULE = 1e-5
TOL_BACKBONE = dict(atol=1e-4, rtol=1e-4)
TOL_FG = 1e-5
TOL_MC = 1e-4
TOL_MEMORY = 1e-4
TOL_DEC_LOGITS = 5e-3
TOL_DEC_BOXES = 5e-4
TOL_DET_SCORES = 2e-3
TOL_LOSS = 1e-4                    # relative, every loss term and the total
TOL_DN_BOX = 1e-5
TOL_GRAD_NORM = 1e-2
TOL_GRAD_NORM_ATOL = 1e-8          # where the reference norm is below 1e-6
TOL_GRAD_REL_L2 = 2e-2
TOL_GRAD_MAX = 3e-2


@dataclasses.dataclass
class StageResult:
  """One row of the parity report."""
  stage: str
  max_error: float
  tolerance: str
  passed: Optional[bool]     # None: skipped, its arrays are absent (the stage name says why)
  detail: str = ""
  arbitrated: bool = False   # judged by the float64 arbitration (decisions §8, revised)

  def row(self):
    status = ("PASS (f64)" if self.arbitrated else "PASS") if self.passed else (
        "FAIL" if self.passed is False else "SKIP")
    return f"{self.stage:44s} {self.max_error:11.3e}  {self.tolerance:28s} {status}  {self.detail}"


def compare_close(stage, ours, ref, atol=0.0, rtol=0.0, detail=""):
  """|ours - ref| <= atol + rtol * |ref| elementwise; reports the max abs error."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    return StageResult(stage, float("inf"), f"shape {ref.shape}", False,
                       f"shape mismatch: ours {ours.shape}")
  err = np.abs(ours - ref)
  ok = bool(np.all(err <= atol + rtol * np.abs(ref)))
  tol = " + ".join(t for t in ((f"atol {atol:g}" if atol else ""), (f"rtol {rtol:g}" if rtol else ""))
                   if t) or "exact"
  return StageResult(stage, float(err.max()) if err.size else 0.0, tol, ok, detail)


def compare_exact(stage, ours, ref, detail=""):
  ours, ref = np.asarray(ours), np.asarray(ref)
  if ours.shape != ref.shape:
    return StageResult(stage, float("inf"), "exact", False, f"shape mismatch: ours {ours.shape} "
                       f"vs {ref.shape}")
  mismatches = int(np.sum(ours != ref))
  return StageResult(stage, float(mismatches), "exact (count)", mismatches == 0, detail)


def tie_aware_topk_mismatch(ours_idx, ref_idx, ref_key, eps):
  """Mismatching elements of one top-k index list [k] (sorted by decreasing key), given the
  reference key [n] of every candidate (decisions §8): elements whose reference key is within eps
  of the k-th may differ, and neighbours closer than eps may swap. 0 = equal up to ties."""
  ours_idx, ref_idx = np.asarray(ours_idx), np.asarray(ref_idx)
  ref_key = np.asarray(ref_key, np.float64)
  if len(ours_idx) != len(ref_idx):
    return max(len(ref_idx), len(ours_idx))
  kth = ref_key[ref_idx].min()
  unambiguous = lambda idx: set(idx[~(np.abs(ref_key[idx] - kth) <= eps)].tolist())
  # The reference keys read in our order must also follow the reference's sorted keys within eps.
  return (len(unambiguous(ours_idx) ^ unambiguous(ref_idx))
          + int(np.sum(np.abs(ref_key[ours_idx] - ref_key[ref_idx]) > eps)))


def compare_topk(stage, ours_idx, ref_idx, ref_key, eps):
  """Tie-aware comparison of batched top-k lists [B, k] with keys [B, n]."""
  ours_idx, ref_idx, ref_key = np.asarray(ours_idx), np.asarray(ref_idx), np.asarray(ref_key)
  bad = sum(tie_aware_topk_mismatch(o, r, key, eps)
            for o, r, key in zip(ours_idx, ref_idx, ref_key))
  exact = int(np.sum(ours_idx != ref_idx)) if ours_idx.shape == ref_idx.shape else -1
  return StageResult(stage, float(bad), f"tie-aware exact (eps {eps:g})", bad == 0,
                     f"{exact} raw position differences")


def detection_box_errors(ours, ref, score_eps=2e-3):
  """Per reference detection, the box error of its best tie-aware match among ours.

  ours/ref: dicts with `scores` [k], `labels` [k], `boxes` [k, 4] xyxy pixels (sorted).
  Returns [k] float64: nan where the reference score is within `score_eps` of the k-th (it may
  leave our top-k through a near-tie), inf where no detection of ours has the label and a score
  within `score_eps`, else the smallest max-abs box difference among those candidates.
  """
  s_o, s_r = np.asarray(ours["scores"], np.float64), np.asarray(ref["scores"], np.float64)
  labels_o = np.asarray(ours["labels"])
  boxes_o = np.asarray(ours["boxes"], np.float64)
  kth = s_r.min() if len(s_r) else 0.0
  errors = np.full(len(s_r), np.nan)
  for i in range(len(s_r)):
    if abs(s_r[i] - kth) <= score_eps:
      continue
    cand = np.where((np.abs(s_o - s_r[i]) <= score_eps) & (labels_o == ref["labels"][i]))[0]
    errors[i] = (np.abs(boxes_o[cand] - ref["boxes"][i]).max(axis=1).min() if len(cand)
                 else np.inf)
  return errors


def compare_detections(stage, ours, ref, image_size, score_eps=2e-3, box_atol_frac=5e-4):
  """Sorted top-k detections (dicts as in detection_box_errors): scores atol; labels and boxes
  tie-aware (decisions §8)."""
  box_atol = box_atol_frac * max(image_size)
  s_o, s_r = np.asarray(ours["scores"], np.float64), np.asarray(ref["scores"], np.float64)
  results = [compare_close(f"{stage} scores", s_o, s_r, atol=score_eps)]
  errors = detection_box_errors(ours, ref, score_eps)
  checked = errors[~np.isnan(errors)]
  bad = int(np.sum(checked > box_atol))
  worst_box = float(checked[np.isfinite(checked)].max()) if np.isfinite(checked).any() else 0.0
  results.append(StageResult(f"{stage} labels+boxes", float(bad),
                             f"tie-aware (eps {score_eps:g}), box atol {box_atol:.3g}", bad == 0,
                             f"worst matched box error {worst_box:.3e}"))
  return results


def float64_arbitration(row, err32, err64, tol):
  """decisions §8 (revised): a decoder-output stage that misses its float32 tolerance passes as
  `PASS (f64)` when (a) our float64 model is within 2 x tol of the reference and (b) the 99th
  percentile of our float32 error is within tol. The row shows the three numbers.

  row: the float32 StageResult; err32, err64: arrays of abs errors (inf = unmatched).
  """
  err32 = np.asarray(err32, np.float64).ravel()
  err64 = np.asarray(err64, np.float64).ravel()
  max32 = float(err32.max()) if err32.size else 0.0
  max64 = float(err64.max()) if err64.size else 0.0
  p99 = float(np.percentile(err32, 99)) if err32.size else 0.0
  ok = bool(max64 <= 2 * tol and p99 <= tol)
  return dataclasses.replace(
      row, passed=ok, arbitrated=True,
      tolerance=f"{row.tolerance}; f64<=2x, f32 p99<=1x",
      detail=f"f32 max {max32:.3e}, f64 max {max64:.3e}, f32 p99 {p99:.3e}"
             + (f"; {row.detail}" if row.detail else ""))
