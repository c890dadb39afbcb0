"""Same-run speed comparison with detrex (`scripts/compare_detrex.py`), driver side: detrex in
its own Python (`detrex_worker`), ours through the model benchmark's worker (`runner.run_task`),
in the order detrex, ours, detrex again. `profile` drives detrex's per-part split of the train
step (`scripts/profile_detrex.py`, `detrex_profile`)."""

import json
import os
import sys
import time
from pathlib import Path

import focus_detr_jax
from focus_detr_jax import benchmarks
from focus_detr_jax.benchmarks import detrex_profile
from focus_detr_jax.benchmarks import measure as bm
from focus_detr_jax.benchmarks import runner

# The folder that holds the package: on detrex's PYTHONPATH (our package is not installed there).
SOURCE_ROOT = str(Path(focus_detr_jax.__file__).resolve().parents[1])
WORKER = "focus_detr_jax.benchmarks.detrex_worker"   # a module name: not imported here
DEFAULT_CONFIG = "projects/focus_detr/configs/focus_detr_resnet/focus_detr_r50_4scale_12ep.py"


def define_detrex_flags(fv):
  """The flags that locate detrex, and those both detrex scripts share."""
  s, i, _, _, _ = benchmarks.flag_definers(fv)
  s("detrex-python", None, "python of an environment with detrex installed")
  s("detrex-root", os.environ.get("DETREX_ROOT"), "detrex source tree (holds projects/focus_detr); "
    "env DETREX_ROOT")
  s("config", DEFAULT_CONFIG, "detrex config, relative to --detrex-root")
  s("train-size", "512x768", "image size HxW")
  i("train-batch", 2, "")
  i("boxes", 8, "ground-truth boxes per image")
  i("threads", 2, "CPU threads (of each side, in compare_detrex)")
  i("timeout", 1200, "per worker process, seconds")
  s("json", None, "write the results here")


def detrex_args(fv, positional):
  args = benchmarks.script_args(fv, positional)
  if not args.detrex_python or not args.detrex_root:
    from focus_detr_jax import cli   # pylint: disable=import-outside-toplevel
    raise cli.UsageError("--detrex-python and --detrex-root (or DETREX_ROOT) are required")
  return args


def run_detrex(args, spec):
  """One detrex worker process under `args.detrex_python`; its results."""
  result, error = benchmarks.run_worker(
      [args.detrex_python, "-m", WORKER, json.dumps(spec)], timeout=args.timeout, cwd=SOURCE_ROOT,
      env=dict(os.environ, PYTHONPATH=os.pathsep.join([SOURCE_ROOT, args.detrex_root]),
               OMP_NUM_THREADS=str(args.threads)))
  if result is None:
    raise RuntimeError(f"detrex worker failed:\n{error}")
  return result


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


def _worker_spec(args, eval_sizes, train, **extra):
  return dict(config=args.config, detrex_root=args.detrex_root, threads=args.threads,
              repeats=args.repeats, eval_sizes=eval_sizes, train=train,
              train_size=bm.parse_size(args.train_size), train_batch=args.train_batch,
              boxes=args.boxes, **extra)


def compare(args):
  """detrex, ours, detrex again; prints the table and writes `args.json`."""
  if "eval" not in args.parts:
    args.eval_sizes = ""
  spec = _worker_spec(args, [bm.parse_size(s) for s in args.eval_sizes.split(",") if s],
                      "train" in args.parts)
  started, t0 = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.perf_counter()
  detrex_a = run_detrex(args, spec)
  print("detrex (before):", json.dumps(detrex_a), flush=True)
  ours = run_ours(args)
  print("ours:", json.dumps(ours), flush=True)
  detrex_b = run_detrex(args, spec)
  print("detrex (after):", json.dumps(detrex_b), flush=True)
  rows = [dict(name=name, detrex_before_s=detrex_a[name]["median_s"], ours_s=mine["median_s"],
               detrex_after_s=detrex_b[name]["median_s"],
               ratio=min(detrex_a[name]["median_s"], detrex_b[name]["median_s"])
               / mine["median_s"]) for name, mine in ours.items()]
  print(f"\nstarted {started}, {time.perf_counter() - t0:.0f} s, {os.cpu_count()} CPUs, "
        f"{args.threads} threads each side")
  print("\n".join(benchmarks.table(
      ["measurement", "detrex before s", "ours s", "detrex after s", "min(detrex) / ours"],
      [[r["name"], f"{r['detrex_before_s']:.2f}", f"{r['ours_s']:.2f}",
        f"{r['detrex_after_s']:.2f}", f"{r['ratio']:.2f}x"] for r in rows])))
  benchmarks.write_outputs(args, dict(command=" ".join(sys.argv), started=started,
                                      detrex_before=detrex_a, ours=ours, detrex_after=detrex_b,
                                      rows=rows))


def profile(args):
  """detrex's train step timed (`args.repeats` calls after 2 warm-up calls), then one more under
  the torch profiler split per part; prints the markdown (next to ours when `args.ours_json`
  names a `scripts/profile_train.py --json` file: its first row) and writes `args.json` /
  `args.markdown`. Returns the worker's results."""
  spec = _worker_spec(args, [], True, profile=True)
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
  benchmarks.write_outputs(args, dict(command=" ".join(sys.argv), started=started,
                                      detrex=result, ours_json=args.ours_json), md)
  return result
