"""Same-run speed comparison with detrex (`scripts/compare_detrex.py`), driver side: detrex in
its own Python (`detrex_worker`), ours through the model benchmark's worker (`runner.run_task`),
in the order detrex, ours, detrex again. `profile` drives detrex's per-part split of the train
step (`scripts/profile_detrex.py`, `detrex_profile`)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import focus_detr_jax
from focus_detr_jax.benchmarks import detrex_profile
from focus_detr_jax.benchmarks import measure as bm
from focus_detr_jax.benchmarks import runner

# The folder that holds the package: on detrex's PYTHONPATH (our package is not installed there).
SOURCE_ROOT = str(Path(focus_detr_jax.__file__).resolve().parents[1])
WORKER = "focus_detr_jax.benchmarks.detrex_worker"   # a module name: not imported here
DEFAULT_CONFIG = "projects/focus_detr/configs/focus_detr_resnet/focus_detr_r50_4scale_12ep.py"


def define_detrex_flags(fv):
  """The flags that locate detrex: --detrex-python, --detrex-root, --config."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("detrex-python", None, "python of an environment with detrex installed",
                      flag_values=fv)
  flags.DEFINE_string("detrex-root", os.environ.get("DETREX_ROOT"), "detrex source tree (holds "
                      "projects/focus_detr); env DETREX_ROOT", flag_values=fv)
  flags.DEFINE_string("config", DEFAULT_CONFIG, "detrex config, relative to --detrex-root",
                      flag_values=fv)


def run_detrex(args, spec):
  """One detrex worker process under `args.detrex_python`; its results."""
  env = dict(os.environ, PYTHONPATH=SOURCE_ROOT, OMP_NUM_THREADS=str(args.threads))
  proc = subprocess.run([args.detrex_python, "-m", WORKER, json.dumps(spec)],
                        capture_output=True, text=True, env=env, cwd=SOURCE_ROOT,
                        timeout=args.timeout)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"detrex worker failed:\n{(proc.stderr or proc.stdout)[-3000:]}")


def run_ours(args):
  """Ours, each measurement in its own worker process (`runner.run_task`)."""
  specs = [(f"eval {h}x{w} b1", dict(task="eval", config="r50", height=h, width=w, batch=1,
                                     repeats=args.repeats))
           for h, w in [bm.parse_size(s) for s in args.eval_sizes.split(",") if s]]
  if "train" in args.parts:
    h, w = bm.parse_size(args.train_size)
    specs.append((f"train {h}x{w} b{args.train_batch}",
                  dict(task="train", config="r50", height=h, width=w, batch=args.train_batch,
                       msda="auto", repeats=args.repeats,
                       model=json.loads(args.model_overrides))))
  out = {}
  for name, spec in specs:
    r = runner.run_task(spec, args.timeout)
    if "error" in r:
      raise RuntimeError(r["error"])
    out[name] = dict(median_s=r["median_s"], min_s=r["min_s"],
                     peak_rss_gib=r["memory"]["mib"] / 1024)
  return out


def compare(args):
  """detrex, ours, detrex again; prints the table and writes `args.json`."""
  if "eval" not in args.parts:
    args.eval_sizes = ""
  spec = dict(config=args.config, detrex_root=args.detrex_root, threads=args.threads,
              repeats=args.repeats,
              eval_sizes=[bm.parse_size(s) for s in args.eval_sizes.split(",") if s],
              train="train" in args.parts, train_size=bm.parse_size(args.train_size),
              train_batch=args.train_batch, boxes=args.boxes)
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  t0 = time.perf_counter()
  detrex_a = run_detrex(args, spec)
  print("detrex (before):", json.dumps(detrex_a), flush=True)
  ours = run_ours(args)
  print("ours:", json.dumps(ours), flush=True)
  detrex_b = run_detrex(args, spec)
  print("detrex (after):", json.dumps(detrex_b), flush=True)
  rows = []
  print(f"\nstarted {started}, {time.perf_counter() - t0:.0f} s, {os.cpu_count()} CPUs, "
        f"{args.threads} threads each side")
  print("| measurement | detrex before s | ours s | detrex after s | min(detrex) / ours |")
  print("|---|---|---|---|---|")
  for name, mine in ours.items():
    a, b = detrex_a[name]["median_s"], detrex_b[name]["median_s"]
    ratio = min(a, b) / mine["median_s"]
    rows.append(dict(name=name, detrex_before_s=a, ours_s=mine["median_s"], detrex_after_s=b,
                     ratio=ratio))
    print(f"| {name} | {a:.2f} | {mine['median_s']:.2f} | {b:.2f} | {ratio:.2f}x |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(command=" ".join(sys.argv), started=started, detrex_before=detrex_a,
                     ours=ours, detrex_after=detrex_b, rows=rows), f, indent=1)


def profile(args):
  """detrex's train step timed (`args.repeats` calls after 2 warm-up calls), then one more under
  the torch profiler split per part; prints the markdown (next to ours when `args.ours_json`
  names a `scripts/profile_train.py --json` file: its first row) and writes `args.json` /
  `args.markdown`. Returns the worker's results."""
  spec = dict(config=args.config, detrex_root=args.detrex_root, threads=args.threads,
              repeats=args.repeats, eval_sizes=[], train=True,
              train_size=bm.parse_size(args.train_size), train_batch=args.train_batch,
              boxes=args.boxes, profile=True)
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  result = run_detrex(args, spec)
  ours = None
  if args.ours_json:
    with open(args.ours_json) as f:
      ours = json.load(f)["rows"][0]
  name = f"train {spec['train_size'][0]}x{spec['train_size'][1]} b{args.train_batch}"
  md = (f"detrex {name}, started {started}, {args.threads} threads: median "
        f"{result[name]['median_s']:.2f} s unprofiled\n\n"
        + detrex_profile.markdown(result["profile"], ours))
  print(md)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(command=" ".join(sys.argv), started=started, detrex=result,
                     ours_json=args.ours_json), f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(md)
  return result
