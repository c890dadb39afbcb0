"""Markdown summary of `check_parity.py --json` outputs (used to write PARITY.md).

  python scripts/check_parity.py --reference-dir ../shared/parity/public --json public.json
  python scripts/parity_report.py public.json swin_tiny.json > report.md

Per recorded set: stages run / passed / failed, then one row per stage family (the stage name
with layer and level numbers folded, e.g. `eval/oesm_sel_local_layer*`) with its largest error
and tolerance, then every failing stage in full.
"""

import json
import re
from pathlib import Path

from focus_detr_jax import cli


def family(stage: str) -> str:
  """`eval/fg_inds_layer3` -> `eval/fg_inds_layer*`; `grads/norm/a.b.0.c` -> `grads/norm`."""
  parts = stage.split("/")
  if len(parts) > 2:
    return "/".join(parts[:2])
  return re.sub(r"\d+", "*", stage)


def summarize(name: str, data: dict) -> str:
  rows = data["results"]
  failed = [r for r in rows if not r["passed"]]
  arbitrated = [r for r in rows if r["passed"] and r.get("arbitrated")]
  out = [f"### {name}", "",
         f"{len(rows)} stages, {len(rows) - len(failed)} pass"
         + (f" ({len(arbitrated)} as PASS (f64))" if arbitrated else "") + f", {len(failed)} fail"
         + (f"; skipped (absent files or arrays): {', '.join(data['skipped'])}"
            if data.get("skipped") else ""), "",
         "| stage family | stages | fail | largest error | tolerance |", "|---|---|---|---|---|"]
  families = {}
  for r in rows:
    families.setdefault(family(r["stage"]), []).append(r)
  for fam, members in families.items():
    worst = max(members, key=lambda r: (not r["passed"], r["max_error"]))
    nfail = sum(not r["passed"] for r in members)
    status = " (f64)" if worst["passed"] and worst.get("arbitrated") else ""
    out.append(f"| `{fam}` | {len(members)} | {nfail or ''} | {worst['max_error']:.3g}{status} | "
               f"{worst['tolerance']} |")
  for title, members in (("Passing under the float64 arbitration (decisions §8)", arbitrated),
                         ("Failing stages", failed)):
    if members:
      out += ["", f"{title}:", "", "| stage | error | tolerance | detail |", "|---|---|---|---|"]
      out += [f"| `{r['stage']}` | {r['max_error']:.3g} | {r['tolerance']} | {r['detail']} |"
              for r in members]
  return "\n".join(out) + "\n"


def run(fv, json_files):
  del fv
  if not json_files:
    raise cli.UsageError("give one or more JSON files written by check_parity.py --json")
  for path in map(Path, json_files):
    print(summarize(path.stem, json.loads(path.read_text())))
  return 0


def main(argv=None):
  return cli.main(__doc__, lambda fv, argv: None, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
