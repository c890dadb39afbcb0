"""Evaluate a model checkpoint or a training workdir with pycocotools.

  python scripts/evaluate.py --config=configs/demo_synthetic.py --workdir=/tmp/run
  python scripts/evaluate.py --config=configs/focus_detr_r50_4scale_12ep.py --checkpoint=DIR

With --workdir the latest training checkpoint is evaluated (EMA parameters if present);
with --checkpoint a model checkpoint (focus_detr_jax/checkpoint.py format, e.g. converted
detrex weights). Results JSON and metrics go to --workdir (or the checkpoint directory).
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model checkpoint directory.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  import jax
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    raise app.UsageError("give exactly one of --workdir and --checkpoint")
  from focus_detr_jax.evaluation.coco_eval import format_table
  from focus_detr_jax.evaluation.evaluator import Evaluator
  from focus_detr_jax.inference import load_variables
  from focus_detr_jax.models.focus_detr import FocusDETR
  logging.getLogger().setLevel(logging.INFO)
  config = _CONFIG.value
  variables, step = load_variables(config, _WORKDIR.value, _CHECKPOINT.value)
  model = FocusDETR.from_config(config.model)
  evaluator = Evaluator(model, config, _WORKDIR.value or _CHECKPOINT.value,
                        max_batches=config.eval.max_batches or None)
  metrics = evaluator.run(variables, step)
  print(format_table(metrics))


if __name__ == "__main__":
  app.run(main)
