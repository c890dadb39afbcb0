"""Per-part, per-HLO-category profile of a compiled XLA:CPU program (scripts/profile_train.py).

`measure` compiles one program of `tasks.program` (XLA memory and cost analysis), times it and
reduces a `jax.profiler` trace of one call; `markdown` renders the rows.

A `jax.profiler` trace of one call has one event per executed thunk (an HLO instruction of the
optimised program, nested in `while` bodies and `ThunkExecutor` spans) on each XLA worker thread.
`self_times` gives the self time per instruction (thread-seconds: two busy cores give twice the
wall time), `wall_shares` its share of the wall time. `hlo_metadata` maps each instruction to its
`op_name` (a fusion: the most frequent one of its fused computation), from which `classify` reads
the direction (`bwd`: JAX's `transpose(jvp(...))` or a hand-written VJP, scope `custom_bwd`; XLA
may merge a backward gather into the identical forward one, which then counts as forward) and the
part (Flax module path, the objective's named scopes, the cascade's token gather/scatter);
`category` is the instruction name without its number (`ynn_fusion` = YNNPACK dot/conv,
`transpose_copy_fusion` = layout changes, `while` = loops, ...).
"""

import collections
import glob
import json
import os
import re
import tempfile
from typing import Dict, Iterable, Tuple

import jax

from focus_detr_jax.benchmarks import measure as bm
from focus_detr_jax.benchmarks import table
from focus_detr_jax.benchmarks import tasks

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^%?([\w.\-]+) .*\{\s*$")


def hlo_metadata(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> op_name of an optimised HLO module (`compiled.as_text()`).

  Fusions without metadata take the most frequent op_name of their fused computation.
  """
  meta, calls, comp_ops = {}, {}, collections.defaultdict(collections.Counter)
  conv_comps, current = set(), None
  for line in hlo_text.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      m = _COMP.match(line)
      current = m.group(1) if m else None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name = m.group(1)
    if m.group(2) == "convolution" and current is not None:
      conv_comps.add(current)
    op = _OP_NAME.search(line)
    if op:
      meta[name] = op.group(1)
      if current is not None:
        comp_ops[current][op.group(1)] += 1
    c = _CALLS.search(line)
    if c:
      calls[name] = c.group(1)
  for name, comp in calls.items():
    ops = comp_ops.get(comp)
    if ops and (name not in meta or "fusion" in name):
      # Backward when any fused op is a transpose: XLA fuses recomputed forward ops into the
      # backward's fusions (rematerialisation), not the other way round.
      bwd = collections.Counter({o: n for o, n in ops.items() if classify(o)[0] == "bwd"})
      meta[name] = (bwd or ops).most_common(1)[0][0]
    elif not ops and comp in conv_comps and name not in meta:
      # XLA's rewrite of a convolution's weight gradient (`convolution-window-dilated`) drops
      # the metadata; the only convolutions are the backbone's and the neck's.
      meta[name] = "transpose(jvp(FocusDETR))/backbone/conv_weight_gradient"
  return meta


def _worker_events(trace_dir: str):
  """Per XLA worker thread of the newest trace (`*.xplane.pb`) in `trace_dir`: its events (start
  ps, end ps, name), sorted by start, enclosing events first."""
  # The xplane proto TensorFlow ships; imported here, as only a traced profile needs TensorFlow.
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  space = xplane_pb2.XSpace()
  with open(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1], "rb") as f:
    space.ParseFromString(f.read())
  for plane in space.planes:
    md = plane.event_metadata
    for line in plane.lines:
      if line.name.startswith("tf_XLAEigen"):
        t0 = line.timestamp_ns * 1000
        yield sorted(((t0 + e.offset_ps, t0 + e.offset_ps + e.duration_ps,
                       md[e.metadata_id].name) for e in line.events),
                     key=lambda e: (e[0], -e[1]))


def self_times(trace_dir: str) -> Dict[str, float]:
  """Self time (seconds, summed over XLA worker threads) per event name of the newest trace."""
  out = collections.Counter()
  for events in _worker_events(trace_dir):
    stack = []
    for start, end, name in events:
      while stack and stack[-1][1] <= start:
        stack.pop()
      if stack:
        out[stack[-1][2]] -= end - start
      out[name] += end - start
      stack.append((start, end, name))
  return {k: v / 1e12 for k, v in out.items()}


def wall_shares(trace_dir: str) -> Dict[str, float]:
  """Wall time per event name: each instant of the traced call is shared equally by the
  innermost events running on the XLA worker threads at that instant, so the shares sum to
  the time any worker was busy, and an instruction that runs while the other cores idle (a
  serial loop, a single-threaded kernel) gets its full duration. Idle time is `"idle"`."""
  boundaries = []
  for events in _worker_events(trace_dir):
    # Flatten nesting: the innermost open event owns each instant. Segments: (start, end, name).
    # The sentinel at infinity closes every event left open.
    segments, stack, last = [], [], None
    for start, end, name in events + [(float("inf"), float("inf"), None)]:
      while stack and stack[-1][0] <= start:
        top_end, top_name = stack.pop()
        if last < top_end:
          segments.append((last, top_end, top_name))
          last = top_end
      if stack and last < start:
        segments.append((last, start, stack[-1][1]))
      last = start
      stack.append((end, name))
    boundaries += [b for start, end, name in segments for b in ((start, 1, name), (end, -1, name))]
  boundaries.sort(key=lambda b: (b[0], b[1]))
  out, active = collections.Counter(), collections.Counter()
  prev = boundaries[0][0] if boundaries else 0
  for t, kind, name in boundaries:
    n = sum(active.values())
    if t > prev:
      if n == 0:
        out["idle"] += t - prev
      else:
        for k, c in active.items():
          out[k] += (t - prev) * c / n
    prev = t
    active[name] += kind
    if active[name] == 0:
      del active[name]
  return {k: v / 1e12 for k, v in out.items()}


_MODULE = re.compile(r"FocusDETR\)*/(\w+)")


def classify(op_name: str) -> Tuple[str, str]:
  """(direction, part) of an op_name."""
  direction = "bwd" if ("transpose(" in op_name or "custom_bwd" in op_name) else "fwd"
  m = _MODULE.search(op_name)
  if m:
    top = m.group(1)
    if top.startswith(("encoder_layers_", "decoder_layers_")) or top in ("backbone", "neck"):
      return direction, top
    if top.startswith(("enc_mask_predictor", "enc_output")):
      return direction, "selector"
    if top.startswith(("class_embed", "bbox_embed", "ref_point_head", "decoder_norm")):
      return direction, "heads"
    if "_take" in op_name or "gather" in op_name:
      return direction, "cascade gather"
    if "scatter" in op_name:
      return direction, "cascade scatter"
    return direction, "model other"
  for scope in ("matcher", "denoising", "losses"):  # innermost first: matcher is inside losses
    if re.search(rf"[/(]{scope}[)/]|/{scope}$", op_name):
      return direction, scope
  if "/while" in op_name:
    return direction, "matcher"
  return direction, "other"


def category(instruction: str) -> str:
  return re.sub(r"[.\d]+$", "", instruction)


def profile_table(times: Dict[str, float], meta: Dict[str, str]):
  """Aggregates self times: returns (by_part, by_category, by_op) Counters (seconds)."""
  by_part, by_cat, by_op = collections.Counter(), collections.Counter(), collections.Counter()
  for name, t in times.items():
    if name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
      by_part[("-", "runtime")] += t
      continue
    op = meta.get(name, "?")
    d, p = classify(op)
    by_part[(d, p)] += t
    by_cat[(d, category(name))] += t
    by_op[(name, op)] += t
  return by_part, by_cat, by_op


def ordered_parts(by_part) -> Iterable[str]:
  """Parts in model order (backbone first, losses last)."""
  order = (["denoising", "backbone", "neck", "selector", "cascade gather", "cascade scatter"]
           + [f"encoder_layers_{i}" for i in range(12)] + ["model other"]
           + [f"decoder_layers_{i}" for i in range(12)]
           + ["heads", "matcher", "losses", "other", "runtime"])
  return sorted({p for _, p in by_part}, key=lambda p: order.index(p) if p in order else len(order))


def measure(args, remat):
  """One row: compile, memory and FLOPs, then (unless `args.compile_only`) the timing and the
  profile of one traced call. `args`: the script's flags as attributes; `remat`: a
  `model.remat` policy or None (the config's)."""
  h, w = bm.parse_size(args.size)
  spec = dict(config=args.config, height=h, width=w, batch=args.batch,
              model=dict(remat=remat) if remat is not None else {})
  fn, inputs = tasks.program(spec, args.program)
  compiled, lower_s, compile_s = bm.compile_jitted(fn, *inputs)
  ma = compiled.memory_analysis()
  gib = 2.0 ** 30
  row = dict(program=args.program, config=args.config, size=args.size, batch=args.batch,
             remat=remat, compile_s=lower_s + compile_s,
             gflops=(bm.cost_flops(compiled) or 0) / 1e9,
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
  with jax.profiler.trace(trace_dir):
    row["traced_call_s"] = bm.time_calls(compiled, *inputs, repeats=1, warmup=0)["median_s"]
  hlo_text = compiled.as_text()
  if args.save_dir:
    os.makedirs(args.save_dir, exist_ok=True)
    with open(os.path.join(args.save_dir, f"{args.program}_{args.size}_{remat}.hlo.txt"), "w") as f:
      f.write(hlo_text)
  row["trace_dir"] = trace_dir
  meta = hlo_metadata(hlo_text)
  by_part, by_cat, by_op = profile_table(self_times(trace_dir), meta)
  wall = wall_shares(trace_dir)
  row["idle_s"] = wall.pop("idle", 0.0)
  wall_part, _, _ = profile_table(wall, meta)
  row["wall_by_part"] = {f"{d} {p}": t for (d, p), t in wall_part.items()}
  row["profile_total_s"] = sum(by_part.values())
  row["by_part"] = {f"{d} {p}": t for (d, p), t in by_part.items()}
  row["by_category"] = {f"{d} {c}": t for (d, c), t in by_cat.most_common(args.top)}
  row["top_ops"] = [[n, op[:160], t] for (n, op), t in by_op.most_common(args.top)]
  row["parts_order"] = list(ordered_parts(by_part))
  return row


def markdown(rows):
  """The memory/compile/timing table, then each profiled row's tables."""
  out = table(["program", "config size batch", "remat", "XLA temp GiB", "args GiB", "GFLOPs",
               "compile s", "median s"],
              [[r["program"], f"{r['config']} {r['size']} b{r['batch']}", str(r["remat"]),
                f"{r['temp_gib']:.2f}", f"{r['argument_gib']:.2f}", f"{r['gflops']:.1f}",
                f"{r['compile_s']:.1f}", f"{r.get('median_s', float('nan')):.2f}"] for r in rows])
  for r in rows:
    if "by_part" not in r:
      continue
    wall, self_s = r["wall_by_part"], r["by_part"]
    parts = [[wall.get(f"fwd {p}", 0.0) + wall.get(f"- {p}", 0.0), wall.get(f"bwd {p}", 0.0),
              self_s.get(f"fwd {p}", 0.0) + self_s.get(f"- {p}", 0.0), self_s.get(f"bwd {p}", 0.0)]
             for p in r["parts_order"]]
    out += ["", f"Profile of one call ({r['program']}, {r['config']} {r['size']} b{r['batch']}, "
            f"remat {r['remat']}): traced call {r['traced_call_s']:.2f} s wall, "
            f"{r['profile_total_s']:.2f} thread-s", ""]
    out += table(["part", "fwd wall s", "bwd wall s", "fwd thread-s", "bwd thread-s"],
                 [[p] + [f"{v:.3f}" for v in vals] for p, vals in zip(r["parts_order"], parts)]
                 + [["**total**"] + [f"**{sum(col):.3f}**" for col in zip(*parts)]])
    out.insert(-1, f"| all workers idle | {r['idle_s']:.3f} | | | |")
    out += [""] + table(["HLO category (direction)", "thread-s"],
                        [[k, f"{t:.3f}"] for k, t in list(r["by_category"].items())[:15]])
    out += [""] + table(["top instruction", "op_name", "thread-s"],
                        [[n, f"`{op[:110]}`", f"{t:.3f}"] for n, op, t in r["top_ops"][:15]])
  return "\n".join(out) + "\n"
