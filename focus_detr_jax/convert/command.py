"""The `convert_checkpoint.py` command (flags and what they run), shared by its two scripts."""

import sys

import jax
from absl import flags

from focus_detr_jax import cli
from focus_detr_jax.checkpoint import save_model_checkpoint
from focus_detr_jax.convert import init as init_lib
from focus_detr_jax.convert.to_detrex import export_checkpoint
from focus_detr_jax.models.focus_detr import FocusDETR, init_variables

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
  config = fv.config
  model = FocusDETR.from_config(config.model)
  if fv.format == "detrex":
    variables = init_lib.model_shapes(model)   # exact conversion: nothing is re-initialised
    kind = "model"
  else:
    def variables():   # called once the file has been read and checked
      print("initialising the parts of the model that the backbone file does not hold ...",
            file=sys.stderr)
      seed = config.get("seed", 0) if fv.seed is None else fv.seed
      return init_variables(model, jax.random.PRNGKey(seed))
    kind = "backbone"
  variables, report = init_lib.init_from_checkpoint(variables, src, model, kind=kind,
                                                    format=fv.format)
  save_model_checkpoint(out, variables, config, report)
  print(init_lib.format_report(report, verbose=fv.verbose))
  return 0


def _export(src, out):
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
