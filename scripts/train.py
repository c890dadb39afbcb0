"""Train Focus-DETR.

  python scripts/train.py --config=configs/demo_synthetic.py --workdir=/tmp/run \
      --config.train.num_steps=2000 --config.data.batch_size=8

Multi-host (TPU pod slice, several GPU hosts): run the same command on every host; with
`--distributed` it calls `jax.distributed.initialize()` first (auto-detected on Cloud TPU,
SLURM and Open MPI; elsewhere pass --coordinator_address (or set JAX_COORDINATOR_ADDRESS),
--num_processes and --process_id, and --local_device_ids for one process per GPU).
See docs/training.md.
"""

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Accelerators this process drives (e.g. 0 for one process per "
    "GPU); default: all local devices.")
_NO_EVAL = flags.DEFINE_bool("no_eval", False, "Skip COCO evaluation.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax
  if _DISTRIBUTED.value:
    local_ids = ([int(i) for i in _LOCAL_DEVICE_IDS.value]
                 if _LOCAL_DEVICE_IDS.value is not None else None)
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               local_device_ids=local_ids)
  from focus_detr_jax.train.loop import train_and_evaluate
  logging.getLogger().setLevel(logging.INFO)
  result = train_and_evaluate(_CONFIG.value, _WORKDIR.value, evaluate=not _NO_EVAL.value)
  if result["eval"]:
    from focus_detr_jax.evaluation.coco_eval import format_table
    print(format_table(result["eval"]))


if __name__ == "__main__":
  app.run(main)
