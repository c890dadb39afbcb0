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

import json
import sys

import jax
from absl import flags

from focus_detr_jax import cli, xla_options
from focus_detr_jax.benchmarks import profiling, tasks


def define_flags(fv, argv):
  del argv
  flags.DEFINE_string("config", "r50", f"of {sorted(tasks.CONFIGS)}", flag_values=fv)
  flags.DEFINE_string("size", "512x768", "image size HxW", flag_values=fv)
  flags.DEFINE_integer("batch", 2, "batch size", flag_values=fv)
  flags.DEFINE_enum("program", "train", ["train", "fwd", "eval"], "program to profile",
                    flag_values=fv)
  flags.DEFINE_string("remat", None, "comma-separated model.remat policies, one measurement each "
                      "(default: the config's)", flag_values=fv)
  flags.DEFINE_enum("xla-cpu-scheduler", "memory", sorted(xla_options.CPU_SCHEDULERS),
                    "XLA:CPU scheduler (config.train.xla_cpu_scheduler; its default is memory); "
                    "an explicit flag in XLA_FLAGS wins", flag_values=fv)
  flags.DEFINE_boolean("compile-only", False, "stop after XLA's memory and cost analysis",
                       flag_values=fv)
  flags.DEFINE_boolean("no-trace", False, "skip the profiler trace", flag_values=fv)
  flags.DEFINE_integer("repeats", 2, "timed calls after the warm-up call", flag_values=fv)
  flags.DEFINE_integer("top", 30, "top instructions to list", flag_values=fv)
  flags.DEFINE_string("save-dir", None, "also write the optimised HLO text here", flag_values=fv)
  flags.DEFINE_string("json", None, "write the rows as JSON here", flag_values=fv)
  flags.DEFINE_string("markdown", None, "write the Markdown tables here", flag_values=fv)


def run(fv, positional):
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  args = cli.namespace(fv, [n for n in fv if n != "debug"])
  xla_options.configure_cpu_scheduler(args.xla_cpu_scheduler)   # before JAX starts its backends
  scheduler = xla_options.user_cpu_scheduler() or "concurrency"
  print(f"XLA:CPU scheduler: {scheduler}")
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  for remat in (args.remat.split(",") if args.remat else [None]):
    rows.append(dict(profiling.measure(args, remat), xla_cpu_scheduler=scheduler))
  md = profiling.markdown(rows)
  print(md)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(command=" ".join(sys.argv), rows=rows), f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(md)
  return 0


def main(argv=None) -> int:
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
