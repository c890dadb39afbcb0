"""Compare two recorded reference sets array by array (numpy only).

  python -m focus_detr_jax.reference.diff NEW_SET OLD_SET [--json out.json] [--verbose]

For every npz file present in both sets and every array in both files: bitwise equal or not, and
the max abs difference (floats) or the number of differing entries (ints, bools, strings). Used to
check that a re-recording reproduces a set (docs/reproducibility.md §6).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def diff_arrays(a, b):
  if a.shape != b.shape:
    return dict(equal=False, shape=[list(a.shape), list(b.shape)])
  if a.dtype.kind in "fc":
    both_nan = np.isnan(a) & np.isnan(b)
    d = np.where(both_nan, 0.0, np.abs(a.astype(np.float64) - b.astype(np.float64)))
    equal = bool(np.array_equal(a, b, equal_nan=True))
    scale = float(np.abs(b.astype(np.float64)).max()) if b.size else 0.0
    return dict(equal=equal, max_abs=float(np.nanmax(d)) if d.size else 0.0, max_abs_ref=scale)
  diff = int(np.sum(a != b))
  return dict(equal=diff == 0, n_diff=diff, size=int(a.size))


def diff_sets(new, old):
  new, old = Path(new), Path(old)
  report = {}
  for f in sorted(p.name for p in old.glob("*.npz")):
    if not (new / f).exists():
      report[f] = "missing in new set"
      continue
    with np.load(new / f) as za, np.load(old / f) as zb:
      keys = [k for k in zb.files if k in za.files]
      report[f] = {k: diff_arrays(za[k], zb[k]) for k in keys}
      report[f]["_only_old"] = sorted(set(zb.files) - set(za.files))
      report[f]["_only_new"] = sorted(set(za.files) - set(zb.files))
  f = "state_dict_manifest.json"
  if (new / f).exists() and (old / f).exists():
    report[f] = dict(equal=json.loads((new / f).read_text()) == json.loads((old / f).read_text()))
  return report


def summary_lines(report, verbose=False):
  lines = []
  for f, entries in report.items():
    if isinstance(entries, str) or "equal" in entries:
      lines.append(f"{f}: {entries}")
      continue
    arrays = {k: v for k, v in entries.items() if not k.startswith("_")}
    same = [k for k, v in arrays.items() if v["equal"]]
    lines.append(f"{f}: {len(same)}/{len(arrays)} arrays bitwise equal"
                 + (f"; only in old: {entries['_only_old']}" if entries["_only_old"] else "")
                 + (f"; only in new: {entries['_only_new']}" if entries["_only_new"] else ""))
    for k, v in arrays.items():
      if v["equal"] and not verbose:
        continue
      if "max_abs" in v:
        lines.append(f"    {k:48s} max|diff| {v['max_abs']:.3e} (max|ref| {v['max_abs_ref']:.3e})")
      elif "n_diff" in v:
        lines.append(f"    {k:48s} {v['n_diff']}/{v['size']} entries differ")
      else:
        lines.append(f"    {k:48s} {v}")
  return lines


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("new")
  p.add_argument("old")
  p.add_argument("--json", default=None)
  p.add_argument("--verbose", action="store_true")
  args = p.parse_args(argv)
  report = diff_sets(args.new, args.old)
  print("\n".join(summary_lines(report, args.verbose)))
  if args.json:
    Path(args.json).write_text(json.dumps(report, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
