"""Model benchmark: eval latency/throughput, train step, compile time, memory, FLOPs split,
keep-ratio sweep against a dense encoder, bf16 vs float32. R50 and Swin-T.

Every measurement runs in its own subprocess (clean compile caches and a per-measurement peak
RSS), one after the other (`--in-process`, implied by `--smoke`: all in this process). Timings
on a shared machine are noisy: each run measures its own baseline, a plain jitted R50 backbone
at 800x1333 (decisions §11 measured 1.14 s there), and reports every latency also as a ratio to
it. Weights are random (timing and FLOPs do not depend on them). The measurements, the runner
and the report: `focus_detr_jax/benchmarks/{tasks,runner,report}.py`.

  .venv/bin/python scripts/benchmark.py --smoke            # ~1 min, tiny model
  .venv/bin/python scripts/benchmark.py                    # default (~20-25 min
                                                           # on a busy 2-core CPU)
  .venv/bin/python scripts/benchmark.py --parts eval,flops --configs swin_t
  .venv/bin/python scripts/benchmark.py --parts sweep --sweep-size 512x768
  .venv/bin/python scripts/benchmark.py --eval-batches 1,8  # adds batch 8 (slow)
  .venv/bin/python scripts/benchmark.py --eval-cells 800x1333:1,512x768:8
  .venv/bin/python scripts/benchmark.py --dry-run ...     # list the measurements

Parts: baseline (always), eval (latency/throughput per config, size, batch), flops (eval FLOPs
split backbone+neck / encoder / rest, per config at 800x1333), train (loss+grad of
`train/objective.py::model_loss`, 512x768 batch 2, per deformable-attention formulation), sweep
(keep-ratio cascades vs a dense encoder: FLOPs and latency), bf16 (eval latency float32 vs bf16).

FLOPs are XLA's cost analysis of the compiled programs (2 per multiply-add; gathers count 0).
The split compiles (and times) two extra programs: backbone+neck alone (a `method=` function on
the model) and the eval forward with `forced["memory"]` given as an input: XLA then removes the
backbone, neck, foreground scoring, cascade top-k and encoder layers as dead code, leaving
two-stage selection + decoder + heads + post-processing ("decoder part"). The encoder part
(foreground scoring, cascade, 6 encoder layers, flattening/positions) = full - backbone+neck -
decoder part, for FLOPs and (approximately) for latency.
"""

import sys

from focus_detr_jax import benchmarks, cli
from focus_detr_jax.benchmarks import runner, tasks


def define_flags(fv, _argv):
  s, i, b, _, e = benchmarks.flag_definers(fv)
  s("parts", "eval,flops,train,sweep", "comma list of eval,flops,train,sweep,bf16 (baseline "
    "always runs)")
  s("configs", "r50,swin_t", f"of {sorted(tasks.CONFIGS)}")
  s("eval-sizes", "800x1333,512x768", "eval canvas sizes")
  s("eval-batches", "1", "eval batch sizes; 8 at 800x1333 takes ~1.5 min per config here")
  s("eval-cells", None, "explicit eval SIZE:BATCH list (e.g. 800x1333:1,512x768:8), instead of "
    "--eval-sizes x --eval-batches")
  s("flops-size", "800x1333", "")
  s("baseline-size", "800x1333", "")
  s("train-configs", "r50", "")
  s("train-size", "512x768", "")
  i("train-batch", 2, "")
  s("train-msda", "gather,auto", "deformable attention formulations to time the train step with")
  s("sweep-size", "800x1333", "")
  s("sweep-config", "r50", "")
  s("sweep-settings", ",".join(str(k) for k in range(len(runner.SWEEP))), "indices into SWEEP (" +
    "; ".join(f"{k}: {n}" for k, (n, _) in enumerate(runner.SWEEP)) + "); starts with 0")
  s("model-overrides", "{}", "JSON dict of config.model fields set in every measurement")
  s("bf16-size", "512x768", "")
  s("bf16-config", "r50", "")
  s("baseline-config", "r50", "")
  i("repeats", 3, "")
  e(*benchmarks.SCHEDULER_FLAG)
  i("timeout", 900, "per measurement, seconds")
  s("json", None, "write raw results here")
  s("markdown", None, "write the markdown report here")
  b("dry-run", False, "list the measurements and exit")
  s("report-from", None, "re-render the markdown of a --json file and exit")
  b("in-process", False, "run the measurements in this process (peak RSS is then the whole "
    "run's)")
  b("smoke", False, "quick check (configs/tiny.py, R26, 1 decoder layer, 64x64, 1 rep, in this "
    "process): baseline, eval with FLOPs split, 2-row sweep; sets every option left at its "
    "default (see SMOKE)")


def run(fv, positional):
  args = benchmarks.script_args(fv, positional)
  if args.smoke:   # smoke values for every option left at its default
    for key, value in runner.SMOKE.items():
      if getattr(args, key) == fv[key.replace("_", "-")].default:
        setattr(args, key, value)
  command = ".venv/bin/python scripts/benchmark.py " + " ".join(sys.argv[1:])
  runner.run(args, command.strip())


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, define_flags, run))
