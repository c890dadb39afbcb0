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


from focus_detr_jax import benchmarks, cli
from focus_detr_jax.benchmarks import detrex


def define_flags(fv, _argv):
  s, i, _, _, e = benchmarks.flag_definers(fv)
  detrex.define_detrex_flags(fv)
  s("parts", "eval,train", "comma list of eval,train")
  s("eval-sizes", "800x1333,512x768", "")
  s("model-overrides", "{}", "JSON config.model overrides for ours, e.g. '{\"remat\": \"none\"}'")
  e(*benchmarks.SCHEDULER_FLAG)
  i("repeats", 3, "timed calls after the warm-up")


def run(fv, positional):
  args = detrex.detrex_args(fv, positional)
  detrex.compare(args)


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, define_flags, run))
