"""Compare focus_detr_jax with data recorded from the official detrex implementation.

  python scripts/check_parity.py --reference-dir ../shared/parity/public [--json out.json]
  python scripts/check_parity.py --reference-dir ../shared/parity/swin_tiny --sensitivity
  python scripts/check_parity.py --reference-dir ../shared/parity/swin_tiny --stages eval \
      --dtype float64

Prints one row per stage (max error, tolerance, pass/fail); exits non-zero on any failure or if
no stage ran. Works on any directory laid out like shared/parity/public (decisions.md §8).
"""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import jax
from absl import flags

from focus_detr_jax import cli
from focus_detr_jax.models.focus_detr import COMPUTE_DTYPES
from focus_detr_jax.parity.diagnostics import decoder_sensitivity
from focus_detr_jax.parity.forward_stages import run_all


FLAGS = ("reference-dir", "json", "stages", "sensitivity", "dtype")


def define_flags(fv, argv):
  del argv
  flags.DEFINE_string("reference-dir", None, "a recorded set laid out like shared/parity/public",
                      flag_values=fv)
  flags.DEFINE_string("json", None, "write the rows as JSON here", flag_values=fv)
  flags.DEFINE_list("stages", None, "stage groups to run, comma-separated (default: all the "
                    "directory allows)", flag_values=fv)
  flags.DEFINE_bool("sensitivity", False, "only print the decoder diagnostics (memory forced "
                    "to the reference, then with N(0, 1e-6) noise; float32 rounding error of the "
                    "reference and of ours against our float64 model); no pass/fail stages",
                    flag_values=fv)
  flags.DEFINE_enum("dtype", None, sorted(COMPUTE_DTYPES), "compute dtype of our model "
                    "(default: the config's, float32); float64 runs under jax.enable_x64, same "
                    "tolerances", flag_values=fv)
  flags.mark_flag_as_required("reference-dir", flag_values=fv)


def run(fv, positional):
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  args = cli.namespace(fv, FLAGS)
  args.reference_dir = Path(args.reference_dir)
  args.json = Path(args.json) if args.json else None
  if args.sensitivity:
    for name, value in decoder_sensitivity(args.reference_dir):
      print(f"{name:70s} {value:11.3e}")
    return 0
  # float64 needs 64-bit JAX; otherwise leave the process's setting as it is.
  with jax.enable_x64(True) if args.dtype == "float64" else contextlib.nullcontext():
    results, skipped = run_all(args.reference_dir, args.stages, dtype=args.dtype)
  for r in results:
    print(r.row())
  for s in skipped:
    print(f"skipped: {s}")
  failed = [r for r in results if not r.passed]
  arbitrated = sum(r.passed and r.arbitrated for r in results)
  print(f"\n{len(results) - len(failed)} passed ({arbitrated} as PASS (f64)), {len(failed)} "
        f"failed, {len(skipped)} skipped (absent files or arrays)")
  if args.json:
    args.json.write_text(json.dumps({"results": [dataclasses.asdict(r) for r in results],
                                     "skipped": skipped}, indent=1))
  if not results:
    print("no stage ran", file=sys.stderr)
    return 2
  return 1 if failed else 0


def main(argv=None):
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
