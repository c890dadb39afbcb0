"""detrex's train step split per model part, forward vs backward (torch profiler, CPU build).

Times the official detrex Focus-DETR train step (R50 by default, `model.train()`, denoising on,
`--boxes` boxes per image, the parity weight rule; medians of `--repeats` calls after 2 warm-up
calls), then profiles one more step with `torch.profiler` and splits it the way
`scripts/profile_train.py` splits ours: forward time per part from `part:<name>` ranges around
the part's modules, backward time per part through the autograd sequence number of the forward
op that made each backward node (focus_detr_jax/benchmarks/detrex_profile.py). `--ours-json`
(a `scripts/profile_train.py --json` file) puts our split beside it.

  .venv/bin/python scripts/profile_detrex.py --detrex-python /path/venv/bin/python \\
      --detrex-root /path/detrex --ours-json /tmp/prof/p0.json --markdown detrex_parts.md
"""

from focus_detr_jax import benchmarks, cli
from focus_detr_jax.benchmarks import detrex


def define_flags(fv, _argv):
  s, i, _, _, _ = benchmarks.flag_definers(fv)
  detrex.define_detrex_flags(fv)
  i("repeats", 2, "timed calls after the warm-up, before the profiled call")
  s("ours-json", None, "scripts/profile_train.py --json output to compare with")
  s("markdown", None, "write the tables here")


def run(fv, positional):
  detrex.profile(detrex.detrex_args(fv, positional))
  return 0


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, define_flags, run))
