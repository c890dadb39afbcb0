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

import sys

from focus_detr_jax import benchmarks, cli
from focus_detr_jax.benchmarks import msda
from focus_detr_jax.models import deformable_attention as da


def define_flags(fv, _argv):
  s, i, b, f, _ = benchmarks.flag_definers(fv)
  s("implementations", ",".join(da.IMPLEMENTATIONS), "comma list")
  s("sizes", "encoder,decoder", "comma list of encoder,decoder")
  i("batch", 1, "batch size")
  i("repeats", 10, "timing rounds")
  f("max-seconds", 20.0, "a program leaves the timing rounds once its calls exceed this")
  b("forward-only", False, "time the forward pass only")
  b("skip-onehot-encoder", False, "skip onehot_matmul at encoder size (quadratic: slow on CPU)")
  s("json", None, "write raw results here")
  s("markdown", None, "write the markdown tables here")


def main_with_flags(fv, positional):
  args = benchmarks.script_args(fv, positional)
  info, results = msda.run(args)
  command = ".venv/bin/python scripts/benchmark_msda.py " + " ".join(sys.argv[1:])
  md = msda.to_markdown(info, results, command.strip())
  print(md)
  benchmarks.write_outputs(args, dict(info=info, results=results), md + "\n")


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, define_flags, main_with_flags))
