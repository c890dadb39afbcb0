r"""Train Focus-DETR in a workdir (running the same command again resumes it).

  python scripts/train.py --config=configs/demo_synthetic.py --workdir=/tmp/run \
      --config.train.num_steps=2000 --config.data.batch_size=8

Any config key can be overridden: `--config.<section>.<key>=value` (tuples as strings,
`--config.data.canvases='((512, 512),)'`). The config is checked before anything is written or
compiled: unknown keys, the batch against the devices and batch groups, and, when the workdir
holds a checkpoint, the model settings against its config.json. Resuming falls back to the
newest checkpoint that restores. User errors end with one `error: ...` line (exit 1; 2 for the
command line); `--debug` shows the traceback.

Multi-host (TPU pod slice, several GPU hosts): run the same command on every host; with
`--distributed` it calls `jax.distributed.initialize()` first (auto-detected on Cloud TPU,
SLURM and Open MPI; elsewhere pass --coordinator_address (or set JAX_COORDINATOR_ADDRESS),
--num_processes and --process_id, and --local_device_ids for one process per GPU).
See docs/training.md.
"""


from absl import flags

from focus_detr_jax import cli


def define_flags(fv, argv):
  cli.define_config(fv, argv, required=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go", flag_values=fv)
  flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize()", flag_values=fv)
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of processes", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index", flag_values=fv)
  flags.DEFINE_list("local_device_ids", None, "accelerators this process drives (e.g. 0 for one "
                    "process per GPU); default: all local devices", flag_values=fv)
  flags.DEFINE_bool("no_eval", False, "skip COCO evaluation", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)


def run(fv, args):
  if args:
    raise cli.UsageError(f"unexpected arguments {args}")
  import jax
  if fv.distributed:
    local_ids = ([int(i) for i in fv.local_device_ids]
                 if fv.local_device_ids is not None else None)
    jax.distributed.initialize(coordinator_address=fv.coordinator_address,
                               num_processes=fv.num_processes, process_id=fv.process_id,
                               local_device_ids=local_ids)
  # Imported after jax.distributed.initialize, which must precede any other use of jax.
  from focus_detr_jax.train.loop import train_and_evaluate
  cli.configure_logging()
  result = train_and_evaluate(fv.config, fv.workdir, evaluate=not fv.no_eval)
  if result["eval"]:
    from focus_detr_jax.evaluation.coco_eval import format_table
    print(format_table(result["eval"]))
  return 0


def main(argv=None) -> int:
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
