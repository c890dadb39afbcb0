"""`scripts/benchmark.py --smoke` (tiny model at 64x64, ~1 min on a loaded 2-core machine): the
baseline, the eval latency with its FLOPs split and a dense-vs-default keep-ratio sweep run and
report their fields. (The train and bf16 parts use the same worker code; `--smoke --parts
eval,flops,sweep,train,bf16` runs them too, at ~3 more minutes of compiles.)"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "benchmark.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  # From another folder and without PYTHONPATH: the installed package is all the script needs.
  proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--json", str(out / "b.json"),
                         "--markdown", str(out / "b.md")],
                        capture_output=True, text=True, timeout=300, cwd=out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out / "b.json") as f:
    saved = json.load(f)
  with open(out / "b.md") as f:
    md = f.read()
  return saved, md


def test_smoke_json_has_every_part(smoke):
  saved, _ = smoke
  assert {"date", "cpu", "nproc", "backend", "jax"} <= set(saved["info"])
  assert "--smoke" in saved["command"]
  results = saved["results"]
  assert not [r for r in results if "error" in r], [r["error"] for r in results if "error" in r]
  parts = [r["part"] for r in results]
  assert parts[0] == "baseline"
  assert {"eval", "sweep"} <= set(parts)
  base = results[0]
  assert base["median_s"] > 0 and base["flops"] > 0
  evals = [r for r in results if r["part"] == "eval"]
  assert evals
  for r in evals:
    for key in ("median_s", "min_s", "images_per_s", "compile_s", "lower_s", "flops", "memory"):
      assert r[key] is not None, key
    assert r["memory"]["mib"] > 0
  split = [r for r in evals if r["spec"].get("split")]
  assert len(split) == 1
  r = split[0]
  # backbone+neck and the decoder part are each a real, smaller part of the full program.
  assert 0 < r["flops_backbone_neck"] < r["flops"]
  assert 0 < r["flops_decoder_part"] < r["flops"]
  assert r["flops_backbone_neck"] + r["flops_decoder_part"] < r["flops"]


def test_smoke_sweep_dense_updates_every_token(smoke):
  saved, _ = smoke
  sweep = [r for r in saved["results"] if r["part"] == "sweep"]
  assert len(sweep) == 2
  dense = sweep[0]
  assert all(c == dense["num_tokens"] for c in dense["capacities"])
  for r in sweep[1:]:
    assert max(r["capacities"]) < dense["num_tokens"]
    assert r["flops"] < dense["flops"]


def test_smoke_markdown_has_every_table(smoke):
  _, md = smoke
  for heading in ("### Run", "#### Eval forward", "#### FLOPs and latency split",
                  "#### Keep-ratio sweep"):
    assert heading in md, heading
  assert "Same-run baseline" in md and "x baseline" in md and "Failed" not in md
  sweep_table = md.split("#### Keep-ratio sweep")[1]
  assert "dense (DINO-like" in sweep_table and "vs dense" in sweep_table


def test_help_is_quick():
  proc = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True,
                        timeout=60, cwd=REPO)
  assert proc.returncode == 0 and "--smoke" in proc.stdout
