"""Measurement helpers shared by the benchmarks and the profile.

Timings on a shared machine are noisy: every benchmark reports a baseline measured in the same
run and ratios against it, plus the median and minimum of several calls.
"""

import datetime
import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import numpy as np


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


def time_calls(fn: Callable, *args, repeats: int = 3, warmup: int = 1,
               max_seconds: Optional[float] = None) -> Dict[str, float]:
  """Median / min wall time of `fn(*args)` (outputs blocked) over `repeats` calls after warmup.

  `max_seconds` stops early (after at least one timed call) once the timed calls exceed it.
  """
  for _ in range(warmup):
    block(fn(*args))
  times = []
  start = time.perf_counter()
  for _ in range(repeats):
    t0 = time.perf_counter()
    block(fn(*args))
    times.append(time.perf_counter() - t0)
    if max_seconds is not None and time.perf_counter() - start > max_seconds:
      break
  return dict(median_s=statistics.median(times), min_s=min(times), calls=len(times))


def cost_flops(compiled) -> Optional[float]:
  """XLA's cost-analysis FLOP count of a compiled program (None when unavailable)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pragma: no cover - backend without cost analysis
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get("flops")
  return float(flops) if flops is not None else None


def peak_memory() -> Dict[str, Any]:
  """Peak memory: device allocator stats when the backend has them, else the process peak RSS.

  The RSS peak (`ru_maxrss`) covers the whole process lifetime: measure one configuration per
  process to attribute it.
  """
  stats = None
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
  cpu = cpu_model()
  try:
    nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip())
  except Exception:  # pragma: no cover
    nproc = os.cpu_count()
  return dict(date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), cpu=cpu, nproc=nproc,
              backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
              jax=jax.__version__, flax=flax.__version__, python=platform.python_version())


def parse_size(text: str) -> Tuple[int, int]:
  """"800x1333" -> (800, 1333)."""
  h, w = text.lower().split("x")
  return int(h), int(w)


def markdown_table(rows, columns) -> str:
  """rows: list of dicts; columns: list of (key, header, format)."""
  head = "| " + " | ".join(h for _, h, _ in columns) + " |"
  sep = "|" + "|".join("---" for _ in columns) + "|"
  lines = [head, sep]
  for row in rows:
    cells = []
    for key, _, fmt in columns:
      value = row.get(key)
      if value is None:
        cells.append("-")
      elif isinstance(value, str):
        cells.append(value)
      else:
        cells.append(format(value, fmt))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def relative_max_diff(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
