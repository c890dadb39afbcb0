"""Per-part, per-HLO-category profile of a compiled XLA:CPU program (scripts/profile_train.py).

A `jax.profiler` trace of one call records one event per executed thunk (an HLO instruction of
the optimised program, nested inside `while` bodies and `ThunkExecutor` spans) on each XLA
worker thread. `self_times` turns the nested events into self time per instruction name
(thread-seconds: two busy cores give twice the wall time). `attribute` maps each instruction to
its `op_name` metadata in the compiled HLO text (for a fusion: the most frequent `op_name` of its
fused computation), and `classify` reads from it:

- direction: `bwd` when JAX's transpose (`transpose(jvp(...))`) or a hand-written VJP (named
  scope `custom_bwd`) produced it, else `fwd` (XLA may merge a backward gather with the
  identical forward one: that work then counts as forward);
- part: the Flax module path (backbone, neck, selector, encoder layer i, decoder layer i, heads)
  or the objective's named scopes (denoising, matcher, losses), with the cascade's token
  gather/scatter (`gather_rows` / `scatter_rows`) as parts of their own;
- category: the instruction name without its number (`ynn_fusion` = YNNPACK dot/conv,
  `*gather*`, `*scatter*`, `transpose_copy_fusion` = layout changes, `while` = loops, ...).
"""

import collections
import glob
import re
from typing import Dict, Iterable, Tuple

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^%?([\w.\-]+) .*\{\s*$")


def hlo_metadata(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> op_name of an optimised HLO module (`compiled.as_text()`).

  Fusions without metadata take the most frequent op_name of their fused computation.
  """
  meta, calls, comp_ops = {}, {}, collections.defaultdict(collections.Counter)
  conv_comps = set()
  current = None
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
      bwd = [o for o in ops if "transpose(" in o or "custom_bwd" in o]
      meta[name] = (collections.Counter({o: ops[o] for o in bwd}) if bwd else ops).most_common(1)[0][0]
    elif not ops and comp in conv_comps and name not in meta:
      # XLA's rewrite of a convolution's weight gradient (`convolution-window-dilated`) drops
      # the metadata; the only convolutions are the backbone's and the neck's.
      meta[name] = "transpose(jvp(FocusDETR))/backbone/conv_weight_gradient"
  return meta


def self_times(trace_dir: str) -> Dict[str, float]:
  """Self time (seconds, summed over XLA worker threads) per event name of the newest trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # the xplane proto TF ships
  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  space = xplane_pb2.XSpace()
  with open(files[-1], "rb") as f:
    space.ParseFromString(f.read())
  out = collections.Counter()
  for plane in space.planes:
    md = plane.event_metadata
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      events = sorted(((e.offset_ps, e.offset_ps + e.duration_ps, md[e.metadata_id].name)
                       for e in line.events), key=lambda e: (e[0], -e[1]))
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
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
  space = xplane_pb2.XSpace()
  with open(files[-1], "rb") as f:
    space.ParseFromString(f.read())
  # Innermost-event segments per thread: (start, end, name).
  boundaries = []
  for plane in space.planes:
    md = plane.event_metadata
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      events = sorted(((e.offset_ps + line.timestamp_ns * 1000, e.duration_ps,
                        md[e.metadata_id].name) for e in line.events),
                      key=lambda e: (e[0], -e[1]))
      # Flatten nesting: the innermost open event owns each instant.
      points = []
      for start, dur, name in events:
        points.append((start, 1, start + dur, name))
      segments, stack, last = [], [], None
      for start, _, end, name in points:
        while stack and stack[-1][0] <= start:
          top_end, top_name = stack.pop()
          if last < top_end:
            segments.append((last, top_end, top_name))
            last = top_end
        if stack and last < start:
          segments.append((last, start, stack[-1][1]))
        last = start
        stack.append((end, name))
      while stack:
        top_end, top_name = stack.pop()
        if last < top_end:
          segments.append((last, top_end, top_name))
          last = top_end
      for start, end, name in segments:
        boundaries.append((start, 1, name))
        boundaries.append((end, -1, name))
  boundaries.sort(key=lambda b: (b[0], b[1]))
  out = collections.Counter()
  active = collections.Counter()
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
    if top.startswith(("encoder_layers_", "decoder_layers_")):
      return direction, top
    if top in ("backbone", "neck"):
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
  def key(p):
    order = ["denoising", "backbone", "neck", "selector", "cascade gather", "cascade scatter"]
    order += [f"encoder_layers_{i}" for i in range(12)] + ["model other"]
    order += [f"decoder_layers_{i}" for i in range(12)] + ["heads", "matcher", "losses", "other",
                                                           "runtime"]
    return order.index(p) if p in order else len(order)
  return sorted({p for _, p in by_part}, key=key)
