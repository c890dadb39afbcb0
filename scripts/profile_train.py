"""Where the train step goes: compile-only memory, timing and a per-part / per-HLO-category profile.

For one program (`--program train`: `value_and_grad` of `model_loss`, train mode, denoising on,
8 boxes per image, random weights; `fwd`: the same loss without the gradient; `eval`: the eval
forward) this prints and optionally writes as JSON / markdown:

- XLA's `memory_analysis()` of the compiled program (temporaries, arguments, outputs) and its
  `cost_analysis()` FLOPs; `--compile-only` stops here (the 800x1333 memory table);
- the median wall time of `--repeats` calls after a warm-up call;
- a `jax.profiler` trace of one call, reduced by `focus_detr_jax/profiling.py` to self time per
  (forward/backward, model part) and per HLO category, and the top instructions.

  PYTHONPATH=. .venv/bin/python scripts/profile_train.py --size 512x768 --batch 2
  PYTHONPATH=. .venv/bin/python scripts/profile_train.py --size 800x1333 --compile-only \
      --remat none,encoder_decoder,all
  PYTHONPATH=. .venv/bin/python scripts/profile_train.py --program fwd --size 256x384

Profile times: *wall s* shares each instant of the call among the instructions running on the XLA
worker threads at that instant (they add up to the call's wall time, minus the time all workers
were idle); *thread-s* are self times summed over the worker threads (2 busy cores count twice).
"""

import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from absl import flags  # noqa: E402

from focus_detr_jax import cli  # noqa: E402


def build_program(args, remat):
  import jax
  import benchmark as bench
  from focus_detr_jax.train.objective import model_loss
  h, w = (int(v) for v in args.size.split("x"))
  spec = dict(config=args.config, height=h, width=w, batch=args.batch,
              model=dict(remat=remat) if remat is not None else {})
  config, model = bench._build(spec)
  variables = bench.random_variables(model)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  batch = bench._train_batch(config, args.batch, h, w)
  key = jax.random.PRNGKey(0)

  def loss(p, batch, key):
    return model_loss(model, p, extra, batch, config, key=key)[0]

  if args.program == "train":
    fn = jax.value_and_grad(loss)
  elif args.program == "fwd":
    fn = loss
  else:
    def fn(p, batch, key):
      return model.apply({"params": p, **extra}, batch["image"], batch["padding_mask"])
  return jax.jit(fn), (params, batch, key)


def measure(args, remat):
  import jax
  from focus_detr_jax import benchmarking as bm
  from focus_detr_jax import profiling
  fn, inputs = build_program(args, remat)
  compiled, lower_s, compile_s = bm.compile_jitted(fn, *inputs)
  ma = compiled.memory_analysis()
  gib = 2.0 ** 30
  row = dict(program=args.program, config=args.config, size=args.size, batch=args.batch,
             remat=remat, compile_s=lower_s + compile_s, gflops=(bm.cost_flops(compiled) or 0) / 1e9,
             temp_gib=ma.temp_size_in_bytes / gib, argument_gib=ma.argument_size_in_bytes / gib,
             output_gib=ma.output_size_in_bytes / gib)
  print(json.dumps(row), flush=True)
  if args.compile_only:
    return row
  row.update(bm.time_calls(compiled, *inputs, repeats=args.repeats))
  print(f"median {row['median_s']:.2f} s, min {row['min_s']:.2f} s", flush=True)
  if args.no_trace:
    return row
  trace_dir = tempfile.mkdtemp(prefix="profile_train_")
  jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  bm.block(compiled(*inputs))
  row["traced_call_s"] = time.perf_counter() - t0
  jax.profiler.stop_trace()
  hlo_text = compiled.as_text()
  if args.save_dir:
    os.makedirs(args.save_dir, exist_ok=True)
    with open(os.path.join(args.save_dir, f"{args.program}_{args.size}_{remat}.hlo.txt"), "w") as f:
      f.write(hlo_text)
  row["trace_dir"] = trace_dir
  meta = profiling.hlo_metadata(hlo_text)
  by_part, by_cat, by_op = profiling.profile_table(profiling.self_times(trace_dir), meta)
  wall = profiling.wall_shares(trace_dir)
  row["idle_s"] = wall.pop("idle", 0.0)
  wall_part, _, _ = profiling.profile_table(wall, meta)
  row["wall_by_part"] = {f"{d} {p}": t for (d, p), t in wall_part.items()}
  row["profile_total_s"] = sum(by_part.values())
  row["by_part"] = {f"{d} {p}": t for (d, p), t in by_part.items()}
  row["by_category"] = {f"{d} {c}": t for (d, c), t in by_cat.most_common(args.top)}
  row["top_ops"] = [[n, op[:160], t] for (n, op), t in by_op.most_common(args.top)]
  row["parts_order"] = list(profiling.ordered_parts(by_part))
  return row


def markdown(rows):
  out = []
  mem = [r for r in rows]
  out.append("| program | config size batch | remat | XLA temp GiB | args GiB | GFLOPs | compile s "
             "| median s |")
  out.append("|---|---|---|---|---|---|---|---|")
  for r in mem:
    out.append(f"| {r['program']} | {r['config']} {r['size']} b{r['batch']} | {r['remat']} | "
               f"{r['temp_gib']:.2f} | {r['argument_gib']:.2f} | {r['gflops']:.1f} | "
               f"{r['compile_s']:.1f} | {r.get('median_s', float('nan')):.2f} |")
  for r in rows:
    if "by_part" not in r:
      continue
    out.append("")
    out.append(f"Profile of one call ({r['program']}, {r['config']} {r['size']} b{r['batch']}, "
               f"remat {r['remat']}): traced call {r['traced_call_s']:.2f} s wall, "
               f"{r['profile_total_s']:.2f} thread-s")
    out.append("")
    out.append("| part | fwd wall s | bwd wall s | fwd thread-s | bwd thread-s |")
    out.append("|---|---|---|---|---|")
    tot = [0.0] * 4
    for p in r["parts_order"]:
      vals = [r["wall_by_part"].get(f"fwd {p}", 0.0) + r["wall_by_part"].get(f"- {p}", 0.0),
              r["wall_by_part"].get(f"bwd {p}", 0.0),
              r["by_part"].get(f"fwd {p}", 0.0) + r["by_part"].get(f"- {p}", 0.0),
              r["by_part"].get(f"bwd {p}", 0.0)]
      tot = [a + v for a, v in zip(tot, vals)]
      out.append(f"| {p} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    out.append(f"| all workers idle | {r['idle_s']:.3f} | | | |")
    out.append("| **total** | " + " | ".join(f"**{v:.3f}**" for v in tot) + " |")
    out.append("")
    out.append("| HLO category (direction) | thread-s |")
    out.append("|---|---|")
    for k, t in list(r["by_category"].items())[:15]:
      out.append(f"| {k} | {t:.3f} |")
    out.append("")
    out.append("| top instruction | op_name | thread-s |")
    out.append("|---|---|---|")
    for n, op, t in r["top_ops"][:15]:
      out.append(f"| {n} | `{op[:110]}` | {t:.3f} |")
  return "\n".join(out) + "\n"


FLAG_NAMES = ("config", "size", "batch", "program", "remat", "compile-only", "no-trace", "repeats",
              "top", "save-dir", "json", "markdown")


def define_flags(fv, argv):
  del argv
  flags.DEFINE_string("config", "r50", "scripts/benchmark.py config key", flag_values=fv)
  flags.DEFINE_string("size", "512x768", "image size HxW", flag_values=fv)
  flags.DEFINE_integer("batch", 2, "batch size", flag_values=fv)
  flags.DEFINE_enum("program", "train", ["train", "fwd", "eval"], "program to profile",
                    flag_values=fv)
  flags.DEFINE_string("remat", None, "comma-separated model.remat policies, one measurement each "
                      "(default: the config's)", flag_values=fv)
  flags.DEFINE_boolean("compile-only", False, "stop after XLA's memory and cost analysis",
                       flag_values=fv)
  flags.DEFINE_boolean("no-trace", False, "skip the profiler trace", flag_values=fv)
  flags.DEFINE_integer("repeats", 2, "timed calls after the warm-up call", flag_values=fv)
  flags.DEFINE_integer("top", 30, "top instructions to list", flag_values=fv)
  flags.DEFINE_string("save-dir", None, "also write the optimised HLO text here", flag_values=fv)
  flags.DEFINE_string("json", None, "write the rows as JSON here", flag_values=fv)
  flags.DEFINE_string("markdown", None, "write the Markdown tables here", flag_values=fv)


def run(fv, positional):
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  args = cli.namespace(fv, FLAG_NAMES)
  import jax
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  for remat in (args.remat.split(",") if args.remat else [None]):
    rows.append(measure(args, remat))
  md = markdown(rows)
  print(md)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(command=" ".join(sys.argv), rows=rows), f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(md)
  return 0


def main(argv=None) -> int:
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
