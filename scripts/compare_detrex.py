"""Same-run speed comparison with the official detrex Focus-DETR (PyTorch CPU).

Measures, in this order and one process each: detrex, ours, detrex again, so that a change of
machine load shows up as a difference between the two detrex runs instead of a false ratio.
Parts: `eval` (eval forward, batch 1, per size: detrex `model.eval()` under `no_grad`; ours the
jitted inference function of scripts/benchmark.py) and `train` (one train step's forward +
backward, R50, denoising on, `--boxes` boxes per image: detrex `sum(loss_dict).backward()` in
`model.train()`; ours `value_and_grad` of `model_loss`). Ratio = detrex median (the faster of its
two runs, the conservative choice) / ours: > 1 means ours is faster. Medians of `--repeats`
calls after warm-up calls (detrex 2, ours 1 after the compile).

detrex runs in its own Python (`--detrex-python`, an environment with torch, detectron2 and
detrex installed, see docs/reproducibility.md); only `focus_detr_jax/benchmarks/detrex_worker.py`
imports it, there. Both sides
use 2 threads by default, the parity weight rule (parity/README §4) for detrex and random
weights for ours (timing does not depend on the values: static shapes, all tokens valid).

  .venv/bin/python scripts/compare_detrex.py --detrex-python /path/venv/bin/python \
      --detrex-root /path/detrex --json /tmp/cmp.json
"""


from absl import flags

from focus_detr_jax import cli, xla_options
from focus_detr_jax.benchmarks import detrex


def define_flags(fv, argv):
  del argv
  s, i = flags.DEFINE_string, flags.DEFINE_integer
  detrex.define_detrex_flags(fv)
  s("parts", "eval,train", "comma list of eval,train", flag_values=fv)
  s("eval-sizes", "800x1333,512x768", "", flag_values=fv)
  s("train-size", "512x768", "", flag_values=fv)
  i("train-batch", 2, "", flag_values=fv)
  i("boxes", 8, "ground-truth boxes per image", flag_values=fv)
  s("model-overrides", "{}", "JSON config.model overrides for ours, e.g. "
    "'{\"remat\": \"none\"}'", flag_values=fv)
  i("threads", 2, "CPU threads of each side", flag_values=fv)
  flags.DEFINE_enum("xla-cpu-scheduler", "memory", sorted(xla_options.CPU_SCHEDULERS),
                    "XLA:CPU scheduler of our side (config.train.xla_cpu_scheduler's default: "
                    "memory); an explicit flag in XLA_FLAGS wins", flag_values=fv)
  i("repeats", 3, "timed calls after the warm-up", flag_values=fv)
  i("timeout", 1200, "per worker process, seconds", flag_values=fv)
  s("json", None, "write the results here", flag_values=fv)


def run(fv, positional):
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  args = cli.namespace(fv, [n for n in fv if n != "debug"])
  # Before JAX starts its backends; worker processes inherit it through XLA_FLAGS.
  xla_options.configure_cpu_scheduler(args.xla_cpu_scheduler)
  if not args.detrex_python or not args.detrex_root:
    raise cli.UsageError("--detrex-python and --detrex-root (or DETREX_ROOT) are required")
  detrex.compare(args)


def main(argv=None):
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
