"""Markdown summary of `check_parity.py --json` outputs (used to write PARITY.md).

  python scripts/check_parity.py --reference-dir ../shared/parity/public --json public.json
  python scripts/parity_report.py public.json swin_tiny.json > report.md

Per recorded set: stages run / passed / failed, then one row per stage family (the stage name
with layer and level numbers folded, e.g. `eval/oesm_sel_local_layer*`) with its largest error
and tolerance, then every failing stage in full.
"""

import argparse
import json
import re
import sys
from pathlib import Path


def family(stage: str) -> str:
  """`eval/fg_inds_layer3` -> `eval/fg_inds_layer*`; `grads/norm/a.b.0.c` -> `grads/norm`."""
  parts = stage.split("/")
  if len(parts) > 2:
    return "/".join(parts[:2])
  return re.sub(r"\d+", "*", stage)


def summarize(name: str, data: dict) -> str:
  rows = data["results"]
  failed = [r for r in rows if not r["passed"]]
  out = [f"### {name}", "",
         f"{len(rows)} stages, {len(rows) - len(failed)} pass, {len(failed)} fail"
         + (f"; skipped groups: {', '.join(data['skipped'])}" if data.get("skipped") else ""), "",
         "| stage family | stages | fail | largest error | tolerance |", "|---|---|---|---|---|"]
  families = {}
  for r in rows:
    families.setdefault(family(r["stage"]), []).append(r)
  for fam, members in families.items():
    worst = max(members, key=lambda r: (not r["passed"], r["max_error"]))
    nfail = sum(not r["passed"] for r in members)
    out.append(f"| `{fam}` | {len(members)} | {nfail or ''} | {worst['max_error']:.3g} | "
               f"{worst['tolerance']} |")
  if failed:
    out += ["", "Failing stages:", "", "| stage | error | tolerance | detail |", "|---|---|---|---|"]
    out += [f"| `{r['stage']}` | {r['max_error']:.3g} | {r['tolerance']} | {r['detail']} |"
            for r in failed]
  return "\n".join(out) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("json_files", nargs="+", type=Path)
  args = parser.parse_args(argv)
  for path in args.json_files:
    print(summarize(path.stem, json.loads(path.read_text())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
