"""Where the train step goes: compile-only memory, timing and a per-part / per-HLO-category profile.

For one program (`--program train`: `value_and_grad` of `model_loss`, train mode, denoising on,
8 boxes per image, random weights; `fwd`: the same loss without the gradient; `eval`: the eval
forward) this prints and optionally writes as JSON / markdown:

- XLA's `memory_analysis()` of the compiled program (temporaries, arguments, outputs) and its
  `cost_analysis()` FLOPs; `--compile-only` stops here (the 800x1333 memory table);
- the median wall time of `--repeats` calls after a warm-up call;
- a `jax.profiler` trace of one call, reduced by `focus_detr_jax/benchmarks/profiling.py` to self
  time per (forward/backward, model part) and per HLO category, and the top instructions.

  .venv/bin/python scripts/profile_train.py --size 512x768 --batch 2
  .venv/bin/python scripts/profile_train.py --size 800x1333 --compile-only \
      --remat none,layers,full,auto
  .venv/bin/python scripts/profile_train.py --xla-cpu-scheduler concurrency   # XLA's default
  .venv/bin/python scripts/profile_train.py --program fwd --size 256x384

Profile times: *wall s* shares each instant of the call among the instructions running on the XLA
worker threads at that instant (they add up to the call's wall time, minus the time all workers
were idle); *thread-s* are self times summed over the worker threads (2 busy cores count twice).
"""

import sys

import jax

from focus_detr_jax import benchmarks, cli, xla_options
from focus_detr_jax.benchmarks import profiling, tasks


def define_flags(fv, _argv):
  s, i, b, _, e = benchmarks.flag_definers(fv)
  s("config", "r50", f"of {sorted(tasks.CONFIGS)}")
  s("size", "512x768", "image size HxW")
  i("batch", 2, "batch size")
  e("program", "train", ["train", "fwd", "eval"], "program to profile")
  s("remat", None, "comma-separated model.remat policies, one measurement each (default: the "
    "config's)")
  e(*benchmarks.SCHEDULER_FLAG)
  b("compile-only", False, "stop after XLA's memory and cost analysis")
  b("no-trace", False, "skip the profiler trace")
  i("repeats", 2, "timed calls after the warm-up call")
  i("top", 30, "top instructions to list")
  s("save-dir", None, "also write the optimised HLO text here")
  s("json", None, "write the rows as JSON here")
  s("markdown", None, "write the Markdown tables here")


def run(fv, positional):
  args = benchmarks.script_args(fv, positional)
  scheduler = xla_options.user_cpu_scheduler() or "concurrency"
  print(f"XLA:CPU scheduler: {scheduler}")
  jax.config.update("jax_enable_compilation_cache", False)
  rows = [dict(profiling.measure(args, remat), xla_cpu_scheduler=scheduler)
          for remat in (args.remat.split(",") if args.remat else [None])]
  md = profiling.markdown(rows)
  print(md)
  benchmarks.write_outputs(args, dict(command=" ".join(sys.argv), rows=rows), md)
  return 0


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, define_flags, run))
