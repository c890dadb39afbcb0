"""The model benchmark's driver (`scripts/benchmark.py`): the plan of measurements, running each
in a fresh worker process (`python -m focus_detr_jax.benchmarks.tasks SPEC`: clean compile
caches and a per-measurement peak RSS) or in this process, and the run loop with its report.

`args` below is the script's flags as attributes (`cli.namespace`).
"""

import json
import os
import subprocess
import sys
import time
import traceback

from focus_detr_jax import benchmarks
from focus_detr_jax.benchmarks import measure as bm
from focus_detr_jax.benchmarks import report, tasks

SWEEP = (  # name, model overrides (`tasks.build`: cascade "ones" = 1.0 per layer)
    ("dense (DINO-like, K_l = N)", dict(focus_rho="dense", cascade="ones")),
    ("rho 0.5, cascade 1 per layer", dict(focus_rho=0.5, cascade="ones")),
    ("rho 0.5, config cascade (default)", dict(focus_rho=0.5)),
    ("rho 0.3, config cascade", dict(focus_rho=0.3)),
)

# `--smoke`: configs/tiny.py shrunk further (ResNet-26 body, 1 decoder layer) at 64x64, one
# repeat, in this process: eval (batch 1, with the FLOPs split) and a 2-row sweep (dense,
# default). Compiles dominate (~1 min on a loaded 2-core machine); add
# `--parts eval,flops,sweep,train,bf16` to exercise the train step (its compile alone takes ~2
# min there) and the bf16 comparison too.
SMOKE = dict(parts="eval,flops,sweep", configs="tiny", eval_sizes="64x64", eval_batches="1",
             flops_size="64x64", baseline_size="64x64", baseline_config="tiny",
             train_configs="tiny", train_size="64x64", train_batch=2, train_msda="auto",
             sweep_size="64x64", sweep_config="tiny", sweep_settings="0,2", bf16_size="64x64",
             bf16_config="tiny", repeats=1, in_process=True,
             model_overrides='{"num_decoder_layers": 1, "backbone.depth": 26}')

_RESULT_CACHE = {}


def run_cached(spec, runner):
  """`runner(spec)`, except that an eval whose resolved model, input and options equal an
  earlier one's (e.g. the sweep's default row and the eval cell of the same size) reuses that
  result instead of compiling and timing the same program again (`--in-process` only)."""
  if spec["task"] != "eval":
    return runner(spec)
  config, _ = tasks.build(spec)   # what an eval depends on: input shape, msda, resolved model
  key = json.dumps([spec["task"], spec["batch"], spec["height"], spec["width"],
                    spec.get("msda"), config.model.to_json(sort_keys=True)])
  cached = _RESULT_CACHE.get(key)
  if (cached is not None and (cached["spec"].get("split") or not spec.get("split"))
      and ("median_s" in cached or not spec.get("time", True))):
    return dict(cached, spec=spec, reused_from=cached["spec"], wall_s=0.0)
  result = runner(spec)
  if "error" not in result:
    _RESULT_CACHE[key] = result
  return result


def run_task_in_process(spec):
  """Runs one task in this process (`--smoke`): no per-measurement RSS, shared caches."""
  t0 = time.perf_counter()
  try:
    result = tasks.run(spec)
  except Exception:  # reported like a failed subprocess
    result = dict(error=traceback.format_exc()[-2000:])
  return dict(result, spec=spec, wall_s=time.perf_counter() - t0)


def run_task(spec, timeout):
  """Runs one task in a fresh process; returns its result dict (or an error entry)."""
  t0 = time.perf_counter()
  try:
    result, error = benchmarks.run_worker(
        [sys.executable, "-m", tasks.__name__, json.dumps(spec)], timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  except subprocess.TimeoutExpired:
    result, error = None, f"timeout after {timeout}s"
  return dict(result or dict(error=error[-2000:]), spec=spec, wall_s=time.perf_counter() - t0)


def plan(args):
  """The list of (part, label, spec) to run, baseline first."""
  bh, bw = bm.parse_size(args.baseline_size)
  specs = [("baseline", f"{args.baseline_config} backbone",
            dict(task="baseline", config=args.baseline_config, height=bh, width=bw,
                 repeats=args.repeats))]
  parts = set(args.parts.split(","))
  cells = [(bm.parse_size(s), int(b)) for s in args.eval_sizes.split(",")
           for b in args.eval_batches.split(",")]
  if args.eval_cells:
    cells = [(bm.parse_size(c.split(":")[0]), int(c.split(":")[1]))
             for c in args.eval_cells.split(",")]
  fh, fw = bm.parse_size(args.flops_size)
  for cfg in args.configs.split(","):
    for (h, w), b in cells:
      split = "flops" in parts and (h, w) == (fh, fw) and b == 1
      if "eval" in parts or split:
        specs.append(("eval", f"{cfg} {h}x{w} b{b}",
                      dict(task="eval", config=cfg, batch=b, height=h, width=w, split=split,
                           time="eval" in parts, repeats=args.repeats)))
    if "flops" in parts and ((fh, fw), 1) not in cells:
      specs.append(("eval", f"{cfg} {fh}x{fw} b1", dict(task="eval", config=cfg, batch=1, height=fh,
                                                       width=fw, split=True, time=False)))
  if "train" in parts:
    th, tw = bm.parse_size(args.train_size)
    for cfg in args.train_configs.split(","):
      for impl in args.train_msda.split(","):
        specs.append(("train", f"{cfg} {th}x{tw} b{args.train_batch} msda={impl}",
                      dict(task="train", config=cfg, batch=args.train_batch, height=th,
                           width=tw, msda=impl, repeats=min(args.repeats, 2),
                           max_seconds=60)))
  if "sweep" in parts:
    sh, sw = bm.parse_size(args.sweep_size)
    # The cascade-independent FLOPs (backbone+neck, decoder part) come from the dense row's
    # split, or from an eval split of the same config and size when there is one.
    have_split = any(spec.get("split") and spec["config"] == args.sweep_config
                     and (spec["height"], spec["width"]) == (sh, sw)
                     for _, _, spec in specs)
    settings = [int(i) for i in args.sweep_settings.split(",")]
    if settings[0] != 0:
      raise ValueError("--sweep-settings must start with 0 (the dense baseline row)")
    for i in settings:
      name, model = SWEEP[i]
      specs.append(("sweep", name, dict(task="eval", config=args.sweep_config, batch=1,
                                        height=sh, width=sw, split=(i == 0 and not have_split),
                                        time_parts=False, repeats=args.repeats,
                                        model=dict(model))))
  if "bf16" in parts:
    h, w = bm.parse_size(args.bf16_size)
    for dtype in ("float32", "bfloat16"):
      specs.append(("bf16", f"{args.bf16_config} {h}x{w} b1 {dtype}",
                    dict(task="eval", config=args.bf16_config, batch=1, height=h, width=w,
                         repeats=args.repeats, model=dict(dtype=dtype))))
  overrides = json.loads(args.model_overrides)
  if overrides:
    for _, _, spec in specs:
      spec["model"] = {**overrides, **spec.get("model", {})}
  return specs


def run(args, command):
  """Runs the plan (or `--dry-run` / `--report-from`); prints the markdown report and writes
  `--json` / `--markdown`. `command` is the command line quoted in the report."""
  if args.report_from:
    with open(args.report_from) as f:
      saved = json.load(f)
    results = [(r.pop("part"), r.pop("label"), r) for r in saved["results"]]
    print(report.report(saved["info"], results, saved.get("command", "(see --json)"),
                        in_process=saved.get("in_process", False)))
    return
  specs = plan(args)
  if args.dry_run:
    for part, label, spec in specs:
      print(part, label, json.dumps(spec))
    return
  info = bm.machine_info()
  results = []
  t_start = time.perf_counter()
  for part, label, spec in specs:
    # In-process (`--smoke`) an identical eval program is measured once; in separate processes
    # every row is measured itself, close in time to its neighbours (the machine's load drifts).
    result = (run_cached(spec, run_task_in_process) if args.in_process
              else run_task(spec, args.timeout))
    results.append((part, label, result))
    brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
             if k not in ("spec", "memory", "error")}
    print(f"[{time.perf_counter() - t_start:7.1f}s] {part} {label}: "
          + (f"ERROR {result['error'][-500:]}" if "error" in result else json.dumps(brief)),
          flush=True)
  md = report.report(info, results, command, in_process=args.in_process)
  print(md)
  print(f"total {time.perf_counter() - t_start:.0f}s")
  benchmarks.write_outputs(args, dict(info=info, command=command, in_process=args.in_process,
                                      results=[dict(part=p, label=l, **r) for p, l, r in results]),
                           md + "\n")
