"""What padding does to the detections: exact vs our canvases vs the old single canvas.

  python scripts/measure_padding.py --parity-dir ../shared/parity/public \
      --parity-dir ../shared/parity/public_800x1067 --model demo_output/model

`--parity-dir` (repeatable): a recorded parity set (detrex's R50 on its deterministic weights);
its eval images exact, padded as detrex batches them, in our evaluation canvas and in the old
800x1333 canvas, with and without our padding mask: how far the top detections move.
`--model`: a trained model checkpoint (`demo_output/model`, written by `scripts/demo.sh`); its
COCO AP on synthetic validation images of six aspect ratios (generated once under `--root`),
evaluated exact, in the chosen evaluation canvases and in one square canvas.
Results: BENCHMARKS.md, "Padding: what it does to the detections".
"""

from pathlib import Path

from absl import flags

from focus_detr_jax import benchmarks, cli


def define_flags(fv, _argv):
  s, i, _, _, _ = benchmarks.flag_definers(fv)
  flags.DEFINE_multi_string("parity-dir", [], "recorded parity set(s) to measure",
                            flag_values=fv)
  s("model", "", "model checkpoint for the AP measurement (demo_output/model)")
  s("root", "/tmp/focus_detr_padding", "where the mixed validation set and its TFDS copy are "
    "written")
  i("per-size", 32, "validation images per size")
  s("json", "", "also write the rows here")


def main_with_flags(fv, positional):
  args = benchmarks.script_args(fv, positional)
  if not args.parity_dir and not args.model:
    raise cli.UsageError("nothing to measure: give --parity-dir and/or --model")
  for d in args.parity_dir:
    if not (Path(d) / "meta.json").exists():
      raise cli.UsageError(f"--parity-dir {d} holds no meta.json (a recorded parity set)")
  if args.model and not (Path(args.model) / "config.json").exists():
    raise cli.UsageError(f"--model {args.model} is not a model checkpoint (run scripts/demo.sh "
                         "first: it writes demo_output/model)")
  from focus_detr_jax.benchmarks import padding  # pylint: disable=import-outside-toplevel
  parity_rows = [r for d in args.parity_dir for r in padding.parity_padding(d)]
  ap_rows = (padding.synthetic_padding_ap(args.model, args.root, per_size=args.per_size)
             if args.model else [])
  print(padding.markdown(parity_rows, ap_rows))
  benchmarks.write_outputs(args, dict(parity=parity_rows, ap=ap_rows))


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, define_flags, main_with_flags))
