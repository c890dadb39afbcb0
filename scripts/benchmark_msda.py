"""Benchmark the deformable attention formulations (forward and forward+backward).

Sizes follow an 800x1333 input (levels 100x167, 50x84, 25x42, 13x21: N = 22223 tokens, 8 heads
of 32, 4 levels, 4 points): `encoder` = 11112 queries (the first cascade layer at focus_rho 0.5),
`decoder` = 900 queries. The baseline is `gather` (the formulation the parity checks were first
run with), measured in the same run; ratios are baseline / formulation (> 1 = faster). All
formulations are compiled first, then timed in interleaved rounds (one call of each per round,
rotating order) so that load changes on a shared machine hit them alike.

  .venv/bin/python scripts/benchmark_msda.py                  # everything
  .venv/bin/python scripts/benchmark_msda.py --sizes decoder \
      --implementations gather,window --repeats 5 --markdown /tmp/msda.md
"""

import json
import sys

from absl import flags

from focus_detr_jax import cli
from focus_detr_jax.benchmarks import msda
from focus_detr_jax.models import deformable_attention as da


def define_flags(fv, argv):
  del argv
  flags.DEFINE_string("implementations", ",".join(da.IMPLEMENTATIONS), "comma list",
                      flag_values=fv)
  flags.DEFINE_string("sizes", "encoder,decoder", "comma list of encoder,decoder",
                      flag_values=fv)
  flags.DEFINE_integer("batch", 1, "batch size", flag_values=fv)
  flags.DEFINE_integer("repeats", 10, "timing rounds", flag_values=fv)
  flags.DEFINE_float("max-seconds", 20.0, "a program leaves the timing rounds once its calls "
                     "exceed this", flag_values=fv)
  flags.DEFINE_bool("forward-only", False, "time the forward pass only", flag_values=fv)
  flags.DEFINE_bool("skip-onehot-encoder", False, "skip onehot_matmul at encoder size "
                    "(quadratic: slow on CPU)", flag_values=fv)
  flags.DEFINE_string("json", None, "write raw results here", flag_values=fv)
  flags.DEFINE_string("markdown", None, "write the markdown tables here", flag_values=fv)


def main_with_flags(fv, positional):
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  args = cli.namespace(fv, [n for n in fv if n != "debug"])
  info, results = msda.run(args)
  command = ".venv/bin/python scripts/benchmark_msda.py " + " ".join(sys.argv[1:])
  md = msda.to_markdown(info, results, command.strip())
  print(md)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(info=info, results=results), f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(md + "\n")


def main(argv=None):
  return cli.main(__doc__, define_flags, main_with_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main())
