r"""Evaluate a model checkpoint or a training workdir with pycocotools.

  python scripts/evaluate.py --workdir=/tmp/run
  python scripts/evaluate.py --checkpoint=DIR --config=configs/focus_detr_r50_4scale_12ep.py

With --workdir the newest training checkpoint that restores is evaluated (EMA parameters if
present; an unreadable newest one is skipped with a warning); with --checkpoint a model checkpoint
(focus_detr_jax/checkpoint.py format, e.g. converted detrex weights). The config is the one saved
in the workdir or beside the checkpoint unless --config is given (overrides may follow it:
`--config.eval.max_batches=10`); its model settings must match the saved ones. Results JSON and
metrics go to --workdir (or the checkpoint directory). User errors end with one `error: ...` line.
"""


from absl import flags

from focus_detr_jax import cli


def define_flags(fv, argv):
  cli.define_config(fv, argv, required=False, help_text="config file (default: the config.json "
                    "of --workdir or --checkpoint), then `--config.<key>=value` overrides")
  flags.DEFINE_string("workdir", None, "training workdir to evaluate", flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "model checkpoint directory", flag_values=fv)
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize()", flag_values=fv)


def run(fv, args):
  if args:
    raise cli.UsageError(f"unexpected arguments {args}")
  if bool(fv.workdir) == bool(fv.checkpoint):
    raise cli.UsageError("give exactly one of --workdir and --checkpoint")
  import jax
  if fv.distributed:
    jax.distributed.initialize()
  # Imported after jax.distributed.initialize, which must precede any other use of jax.
  from focus_detr_jax.data.datasets import DataConfig
  from focus_detr_jax.evaluation.coco_eval import format_table
  from focus_detr_jax.evaluation.evaluator import Evaluator
  from focus_detr_jax.inference import load_variables, resolve_config
  from focus_detr_jax.models.focus_detr import FocusDETR
  cli.configure_logging()
  config = resolve_config(fv.config, fv.workdir, fv.checkpoint)
  variables, step = load_variables(fv.workdir, fv.checkpoint)
  model = FocusDETR.from_config(config.model)
  evaluator = Evaluator(model, DataConfig.from_config(config), config.model.num_select,
                        fv.workdir or fv.checkpoint, max_batches=config.eval.max_batches or None)
  metrics = evaluator.run(variables, step)
  print(format_table(metrics))
  return 0


def main(argv=None) -> int:
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
