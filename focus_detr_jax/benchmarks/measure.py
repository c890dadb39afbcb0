"""Measurement helpers of the jax side: compile, time, FLOPs, memory, machine. Timings on a shared
machine are noisy: every benchmark reports a same-run baseline, ratios, medians and minimums."""

import datetime
import functools
import os
import platform
import resource
import subprocess
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import numpy as np

from focus_detr_jax import benchmarks


def block(tree):
  """Waits for every array of a pytree."""
  for leaf in jax.tree_util.tree_leaves(tree):
    if hasattr(leaf, "block_until_ready"):
      leaf.block_until_ready()
  return tree


def compile_jitted(fn: Callable, *args, **kwargs):
  """Lowers and compiles `jax.jit(fn)` for args; returns (compiled, lower_s, compile_s)."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  t0 = time.perf_counter()
  lowered = jitted.lower(*args, **kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t1


# Outputs blocked, so that a call's time includes its asynchronous work.
time_calls = functools.partial(benchmarks.time_calls, wait=block)


def cost_flops(compiled) -> Optional[float]:
  """XLA's cost-analysis FLOP count of a compiled program (None when unavailable)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backend without cost analysis
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  return None if flops is None else float(flops)


def peak_memory() -> Dict[str, Any]:
  """Peak memory: device allocator stats when the backend has them, else the process peak RSS
  (`ru_maxrss`: the whole process lifetime; measure one configuration per process)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pragma: no cover
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return dict(kind="device_peak_bytes_in_use", mib=stats["peak_bytes_in_use"] / 2**20)
  rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return dict(kind="process_peak_rss", mib=rss_kib / 1024)


def cpu_model(default: str = "unknown") -> str:
  """The CPU's model name (/proc/cpuinfo), else `default`."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:  # pragma: no cover
    pass
  return default


def machine_info() -> Dict[str, Any]:
  """Date, CPU model, core count, backend and versions for a BENCHMARKS.md section header."""
  try:
    nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
  except Exception:  # pragma: no cover
    nproc = os.cpu_count()
  return dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), cpu=cpu_model(),
              nproc=nproc,
              backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
              jax=jax.__version__, flax=flax.__version__, python=platform.python_version())


def parse_size(text: str) -> Tuple[int, int]:
  """"800x1333" -> (800, 1333)."""
  h, w = text.lower().split("x")
  return int(h), int(w)


def markdown_table(rows, columns) -> str:
  """rows: list of dicts; columns: list of (key, header, format); a missing value is "-"."""
  def cell(value, fmt):
    return "-" if value is None else value if isinstance(value, str) else format(value, fmt)
  return "\n".join(benchmarks.table([h for _, h, _ in columns],
                                    [[cell(row.get(k), f) for k, _, f in columns] for row in rows]))


def relative_max_diff(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
