"""Compare focus_detr_jax with data recorded from the official detrex implementation.

  python scripts/check_parity.py --reference-dir ../shared/parity/public [--json out.json]
  python scripts/check_parity.py --reference-dir ../shared/parity/swin_tiny --sensitivity
  python scripts/check_parity.py --reference-dir ../shared/parity/swin_tiny --stages eval \
      --dtype float64

Prints one row per stage (max error, tolerance, pass/fail); exits non-zero on any failure or if
no stage ran. Works on any directory laid out like shared/parity/public (decisions.md §8).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib  # noqa: E402

import jax  # noqa: E402

from focus_detr_jax.models.focus_detr import COMPUTE_DTYPES  # noqa: E402
from focus_detr_jax.parity import check  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
  parser.add_argument("--reference-dir", required=True, type=Path)
  parser.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
  parser.add_argument("--stages", nargs="*", default=None,
                      help="stage groups to run (default: all the directory allows)")
  parser.add_argument("--sensitivity", action="store_true",
                      help="only print the decoder diagnostics (memory forced to the reference, "
                           "then with N(0, 1e-6) noise; float32 rounding error of the reference "
                           "and of ours against our float64 model); no pass/fail stages")
  parser.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default=None,
                      help="compute dtype of our model (default: the config's, float32); "
                           "float64 runs under jax.enable_x64, same tolerances")
  args = parser.parse_args(argv)
  if args.sensitivity:
    for name, value in check.decoder_sensitivity(args.reference_dir):
      print(f"{name:70s} {value:11.3e}")
    return 0
  # float64 needs 64-bit JAX; otherwise leave the process's setting as it is.
  with jax.enable_x64(True) if args.dtype == "float64" else contextlib.nullcontext():
    results, skipped = check.run_all(args.reference_dir, args.stages, dtype=args.dtype)
  for r in results:
    print(r.row())
  for s in skipped:
    print(f"skipped: {s}")
  failed = [r for r in results if not r.passed]
  print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed, {len(skipped)} skipped "
        f"groups")
  if args.json:
    args.json.write_text(json.dumps({"results": [dataclasses.asdict(r) for r in results],
                                     "skipped": skipped}, indent=1))
  if not results:
    print("no stage ran", file=sys.stderr)
    return 2
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
