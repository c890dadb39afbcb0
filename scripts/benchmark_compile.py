"""Compile time of the training step per training canvas, cold and from the persistent cache.

  python scripts/benchmark_compile.py                              # R50 COCO recipe, 8 canvases
  python scripts/benchmark_compile.py --config=tiny --canvases=128x128,128x192

Each canvas is one XLA program of the loop's step (`train/loop.make_train_step`), compiled ahead
of time from shapes (no weights or data) at `--batch` images per device. A first process compiles
into an empty persistent cache; a second loads the same programs, as a restarted run does.
Results: BENCHMARKS.md, "Compile time per training canvas".
"""

import tempfile

from focus_detr_jax import benchmarks, cli


def define_flags(fv, _argv):
  s, i, _, _, _ = benchmarks.flag_definers(fv)
  s("config", "focus_detr_r50_4scale_12ep", "config module under configs/")
  i("batch", 2, "images per device (the COCO recipe: 16 on 8 devices)")
  s("canvases", "", "HxW,HxW,... (default: the config's training canvases)")


def main_with_flags(fv, positional):
  args = benchmarks.script_args(fv, positional)
  try:
    canvases = [tuple(int(x) for x in c.split("x")) for c in args.canvases.split(",")
                if c] or None
  except ValueError:
    raise cli.UsageError(f"--canvases={args.canvases}: expected HxW,HxW,...") from None
  from focus_detr_jax.benchmarks import compile as bench  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory(prefix="compile_cache_") as cache:
    result = bench.run(args.config, args.batch, cache, canvases)
  print(bench.markdown(result))


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, define_flags, main_with_flags))
