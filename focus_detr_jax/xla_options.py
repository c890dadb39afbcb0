"""XLA settings of a process that must be chosen before JAX starts its backends.

`config.train.xla_cpu_scheduler` picks XLA:CPU's instruction scheduler:

- `"memory"` (our default): the memory-minimising scheduler
  (`--xla_cpu_enable_concurrency_optimized_scheduler=false`). On the R50 train step it lowers
  XLA's temporaries by a quarter or more and, on the 2-core machine, is not slower
  (BENCHMARKS.md, "Train step: profile, memory and rematerialisation"); it is also what lets
  `model.remat` lower them at all.
- `"concurrency"`: XLA:CPU's own default, the concurrency-optimised scheduler (orders the program
  for parallel thunks and keeps more buffers alive together).

Why a process setting and not a per-compile option: jax 0.10.2 accepts
`jax.jit(f, compiler_options={"xla_cpu_enable_concurrency_optimized_scheduler": False})`
(and `.lower(...).compile(compiler_options=...)`) without error, but XLA:CPU still schedules
with the process-wide flag value: the compiled program's `memory_analysis()` does not change
(tests/test_xla_options.py keeps watching this). The flag is read from `XLA_FLAGS` once, when
JAX creates its backends, so `configure` must run before the first `jax.devices()`, compile or
array; after that it can only report that the setting could not be applied.

The flag is XLA:CPU's: on a GPU or TPU host it concerns only computations placed on the CPU.
It is only added to `XLA_FLAGS` where CPU is JAX's default platform (no accelerator plugin or
`libtpu` installed, or `JAX_PLATFORMS` starting with `cpu`). A value already in `XLA_FLAGS` is
the user's choice and wins.
"""

import importlib.util
import logging
import os
from typing import Optional

CPU_SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"
CPU_SCHEDULERS = {"memory": "false", "concurrency": "true"}
_warned = set()


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge   # pylint: disable=import-outside-toplevel
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):   # another jax: assume the worst
    return True


def _cpu_is_default_platform() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  try:
    import jax   # pylint: disable=import-outside-toplevel
    platforms = jax.config.jax_platforms or platforms
  except ImportError:
    pass
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  try:
    import jax_plugins   # pylint: disable=import-outside-toplevel
    import pkgutil   # pylint: disable=import-outside-toplevel
    return not any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))
  except ImportError:
    return True


def user_cpu_scheduler() -> Optional[str]:
  """The scheduler `XLA_FLAGS` names already ("memory"/"concurrency"), or None."""
  value = None
  for token in os.environ.get("XLA_FLAGS", "").split():
    name, _, v = token.lstrip("-").partition("=")
    if name == CPU_SCHEDULER_FLAG:
      value = "concurrency" if v.lower() in ("", "true", "1") else "memory"
  return value


def configure_cpu_scheduler(name: str) -> str:
  """Selects XLA:CPU's scheduler `name` for this process (see the module docstring).

  Returns what happened: "set" (added to XLA_FLAGS), "user" (XLA_FLAGS names the flag already:
  kept), "not cpu" (CPU is not the default platform: nothing done), "too late" (JAX's backends
  exist already and the process keeps the scheduler they were created with; logged unless that
  is the asked one)."""
  if name not in CPU_SCHEDULERS:
    raise ValueError(f"train.xla_cpu_scheduler={name!r}: expected one of {tuple(CPU_SCHEDULERS)}")
  user = user_cpu_scheduler()
  if user is not None:
    if user != name:
      logging.info("XLA_FLAGS selects XLA:CPU's %s scheduler; train.xla_cpu_scheduler=%s is not "
                   "applied", user, name)
    return "user"
  if not _cpu_is_default_platform():
    return "not cpu"
  if _backends_initialized():
    if name != "concurrency" and name not in _warned:
      _warned.add(name)
      logging.warning("train.xla_cpu_scheduler=%s not applied: JAX's backends are already "
                      "initialised (set XLA_FLAGS=--%s=%s before starting, or configure before "
                      "the first use of jax)", name, CPU_SCHEDULER_FLAG, CPU_SCHEDULERS[name])
    return "too late"
  flags = os.environ.get("XLA_FLAGS", "")
  os.environ["XLA_FLAGS"] = f"{flags} --{CPU_SCHEDULER_FLAG}={CPU_SCHEDULERS[name]}".strip()
  return "set"


def configure(config) -> str:
  """`configure_cpu_scheduler(config.train.xla_cpu_scheduler)` (a config without the key:
  the default, "memory")."""
  train = config.get("train") if hasattr(config, "get") else None
  name = train.get("xla_cpu_scheduler", "memory") if train is not None else "memory"
  return configure_cpu_scheduler(name)
