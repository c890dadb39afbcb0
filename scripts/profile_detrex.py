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


from absl import flags

from focus_detr_jax import cli
from focus_detr_jax.benchmarks import detrex


def define_flags(fv, argv):
  del argv
  s, i = flags.DEFINE_string, flags.DEFINE_integer
  detrex.define_detrex_flags(fv)
  s("train-size", "512x768", "image size HxW", flag_values=fv)
  i("train-batch", 2, "", flag_values=fv)
  i("boxes", 8, "ground-truth boxes per image", flag_values=fv)
  i("threads", 2, "CPU threads", flag_values=fv)
  i("repeats", 2, "timed calls after the warm-up, before the profiled call", flag_values=fv)
  i("timeout", 1200, "worker process, seconds", flag_values=fv)
  s("ours-json", None, "scripts/profile_train.py --json output to compare with", flag_values=fv)
  s("json", None, "write the results here", flag_values=fv)
  s("markdown", None, "write the tables here", flag_values=fv)


def run(fv, positional):
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  args = cli.namespace(fv, [n for n in fv if n != "debug"])
  if not args.detrex_python or not args.detrex_root:
    raise cli.UsageError("--detrex-python and --detrex-root (or DETREX_ROOT) are required")
  detrex.profile(args)
  return 0


def main(argv=None):
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
