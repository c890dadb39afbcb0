"""Benchmarks and profiles behind the `scripts/benchmark*.py`, `profile_*.py`, `compare_detrex.py`
and `measure_padding.py` commands (BENCHMARKS.md), one module each, and what they share below:
worker processes, timing, markdown tables, flags. Nothing heavy is imported here, so that
`detrex_worker` starts under detrex's Python (torch; no jax, no absl).
"""

import functools
import json
import os
import statistics
import subprocess
import time

from focus_detr_jax import xla_options

# TensorFlow's C++ start-up notices (CPU features, ...) off, unless asked for: set before any
# benchmark module imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
RESULT = "RESULT "   # a worker's last stdout line: RESULT <json>
# DEFINE_enum's arguments of --xla-cpu-scheduler (`script_args` applies it, before JAX starts its
# backends; worker processes inherit it through XLA_FLAGS).
SCHEDULER_FLAG = ("xla-cpu-scheduler", "memory", sorted(xla_options.CPU_SCHEDULERS),
                  "XLA:CPU scheduler of our side (config.train.xla_cpu_scheduler's default: "
                  "memory); an explicit flag in XLA_FLAGS wins")


def time_calls(fn, *args, repeats=3, warmup=1, max_seconds=None, wait=lambda out: out):
  """Median / min wall time of `wait(fn(*args))` over `repeats` calls after `warmup` untimed ones;
  `max_seconds` stops early (after at least one timed call) once the timed calls exceed it."""
  for _ in range(warmup):
    wait(fn(*args))
  times, start = [], time.perf_counter()
  for _ in range(repeats):
    t0 = time.perf_counter()
    wait(fn(*args))
    times.append(time.perf_counter() - t0)
    if max_seconds is not None and time.perf_counter() - start > max_seconds:
      break
  return dict(median_s=statistics.median(times), min_s=min(times), calls=len(times))


def print_result(result):
  print(RESULT + json.dumps(result), flush=True)


def run_worker(command, **kwargs):
  """Runs a worker process (it ends with `print_result`): (its result or None, the tail of its
  stderr, else stdout, as the error)."""
  proc = subprocess.run(command, **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE,
                                    "text": True, **kwargs})
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):]), None
  return None, (proc.stderr or proc.stdout)[-3000:]


def table(header, rows):
  """Markdown table lines: `header` and each row a list of cells (strings)."""
  row = lambda cells: "| " + " | ".join(cells) + " |"   # noqa: E731
  return [row(header), "|---" * len(header) + "|"] + [row(r) for r in rows]


def script_args(fv, positional):
  """A script's flags as attributes (positional arguments are a usage error); its
  --xla-cpu-scheduler, where it has one, applied."""
  from focus_detr_jax import cli   # pylint: disable=import-outside-toplevel  # absl
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  args = cli.namespace(fv, [n for n in fv if n != "debug"])
  if hasattr(args, "xla_cpu_scheduler"):
    xla_options.configure_cpu_scheduler(args.xla_cpu_scheduler)
  return args


def flag_definers(fv):
  """DEFINE_string, _integer, _bool, _float, _enum of absl bound to `fv`."""
  from absl import flags   # pylint: disable=import-outside-toplevel
  return [functools.partial(d, flag_values=fv) for d in (
      flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_bool, flags.DEFINE_float,
      flags.DEFINE_enum)]


def write_outputs(args, data, markdown=None):
  """`data` as JSON to `args.json`, `markdown` to `args.markdown`, where those are set."""
  if getattr(args, "json", None):
    with open(args.json, "w") as f:
      json.dump(data, f, indent=1)
  if markdown is not None and getattr(args, "markdown", None):
    with open(args.markdown, "w") as f:
      f.write(markdown)
