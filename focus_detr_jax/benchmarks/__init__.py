"""Benchmarks and profiles behind the `scripts/benchmark*.py`, `profile_train.py` and
`compare_detrex.py` commands (BENCHMARKS.md).

  measure        timing, compile, FLOPs, memory, machine info, markdown tables (shared)
  tasks          the model benchmark's measurements (run in a worker process or in-process)
  runner         the model benchmark's plan, worker subprocesses, result cache and run loop
  report         the model benchmark's markdown report
  msda           deformable attention formulations, interleaved timing
  profiling      per-part / per-HLO-category profile of a compiled train step
  input          input pipeline throughput and canvas fill
  detrex         same-run speed comparison with detrex (driver side)
  detrex_worker  its detrex side: runs under detrex's Python (torch, no jax)

Nothing heavy is imported here, so that `detrex_worker` starts without jax.
"""

import os

# TensorFlow's C++ start-up notices (CPU features, ...) off, unless asked for: set before any
# benchmark module imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
