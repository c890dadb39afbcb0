r"""Convert weights into one of our model checkpoints, or export ours back to detrex.

Import (every format writes a model checkpoint that training and predict accept):

  python scripts/convert_checkpoint.py --format detrex --config configs/focus_detr_r50_4scale_12ep.py \
      focus_detr_r50_4scale_12ep.pth checkpoints/focus_detr_r50
  python scripts/convert_checkpoint.py --format torchvision --config configs/focus_detr_r50_4scale_12ep.py \
      resnet50-0676ba61.pth checkpoints/r50_imagenet
  python scripts/convert_checkpoint.py --format detectron2 --config ... R-50.pkl OUTPUT_DIR
  python scripts/convert_checkpoint.py --format swin --config configs/focus_detr_swin_tiny_224_4scale_12ep.py \
      swin_tiny_patch4_window7_224.pth checkpoints/swin_t_imagenet

Config overrides follow the config file: `--config.model.num_classes=3`. Prints what was mapped,
skipped (with the reason) and re-initialised (`--verbose`: every array), and ends with
`mapped N/M keys` (M: the input state dict's keys, aliases once). A backbone file gives a full
checkpoint whose neck, transformer and heads are a fresh init (seed `config.seed`).

Export (one of our model checkpoints -> detrex state dict, `.pth` with torch, else `.npz`):

  python scripts/convert_checkpoint.py --export checkpoints/my_model my_model.pth

Exit status: 0 on success; 1 when the input is refused or does not fit the config (one
`error: ...` line naming the keys or objects at fault; `--debug` for the traceback); 2 on a usage
error.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import flags  # noqa: E402

from focus_detr_jax import cli  # noqa: E402

FORMATS = ("detrex", "torchvision", "detectron2", "swin")


def define_flags(fv, argv):
  cli.define_config(fv, argv, required=False)
  flags.DEFINE_enum("format", None, FORMATS, "key layout of INPUT", flag_values=fv)
  flags.DEFINE_boolean("export", False, "export: INPUT is one of our model checkpoints, OUTPUT a "
                       "detrex .pth/.npz file", flag_values=fv)
  flags.DEFINE_boolean("verbose", False, "list every re-initialised array", flag_values=fv)
  flags.DEFINE_integer("seed", None, "seed of the fresh init (default: config.seed)",
                       flag_values=fv)


def _import(fv, src, out):
  from focus_detr_jax.checkpoint import save_model_checkpoint
  from focus_detr_jax.convert import init as init_lib
  config = fv.config
  if fv.format == "detrex":
    variables = init_lib.model_shapes(config)   # exact conversion: nothing is re-initialised
    kind = "model"
  else:
    def variables():   # called once the file has been read and checked
      print("initialising the parts of the model that the backbone file does not hold ...",
            file=sys.stderr)
      return init_lib.init_variables(config, seed=fv.seed)
    kind = "backbone"
  variables, report = init_lib.init_from_checkpoint(variables, src, config, kind=kind,
                                                    format=fv.format)
  save_model_checkpoint(out, variables, config, report)
  print(init_lib.format_report(report, verbose=fv.verbose))
  return 0


def _export(src, out):
  from focus_detr_jax.convert.export import export_checkpoint
  try:
    path, state_dict = export_checkpoint(src, out)
  except RuntimeError as e:   # a .pth export without torch
    raise cli.UserError(str(e)) from e
  print(f"wrote {len(state_dict)} detrex keys to {path}")
  return 0


def run(fv, args) -> int:
  if len(args) != 2:
    raise cli.UsageError(f"expected INPUT and OUTPUT, got {args}")
  src, out = args
  if fv.export:
    return _export(src, out)
  if fv.format is None or fv.config is None:
    raise cli.UsageError("--format and --config are required (or use --export)")
  return _import(fv, src, out)


def main(argv=None) -> int:
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
