"""detrex's train step split per model part and direction (scripts/profile_detrex.py): the
torch-profiler counterpart of `profiling`, which splits our compiled step the same way.

The worker (`detrex_worker` with spec["profile"], under detrex's Python) wraps each part's
modules in `torch.profiler.record_function("part:<name>")` ranges (`add_part_ranges`), profiles
one train step with CPU activity (`profile_step`) and reduces its events, as plain dicts
(`plain_events`), with `attribute`, which needs no torch:

- forward: an op belongs to its innermost enclosing `part:` range (unwrapped code: `other`);
- backward: the autograd engine runs each node inside an `autograd::engine::evaluate_function:
  <Node>` event that carries the node's sequence number and forward thread. The forward op that
  created the node is the *last* forward event on that thread recording that number (an op that
  creates no node records the number the next node will take; ops below the autograd layer
  record -1), so the node's work counts to that op's part. An op may create several nodes with
  consecutive numbers (an in-place op on a view: its node, CopySlices, AsStridedBackward0), of
  which only the first is recorded: a node with no forward event of its own number takes the
  part of the nearest lower recorded number (its time is reported as `nearest_bwd_s`). Nodes
  without a number (AccumulateGrad: -1) and the engine's own time count to `other`;
- time: the self time of every event (its duration minus its children's), so nothing counts
  twice and the Python time inside a part's range counts to that part. CPU autograd runs on the
  calling thread and intra-op worker threads record no events, so with one thread in the trace
  self seconds are wall seconds (`attribute` reports the seconds per thread to check it).

Part names follow `profiling.classify` (ours): `model other` is the transformer's and the
decoder's own code between their submodules; `cascade gather/scatter` is the encoder's own loop
(token gather and scatter around each layer); `heads` are the class/box embeds (including the
encoder's score head `enhance_MCSP`, the decoder's reference-point MLP and final norm).
"""

import bisect
import collections
import itertools
import re
import time

from focus_detr_jax.benchmarks import table

BACKWARD_NODE = "autograd::engine::evaluate_function:"
# Rows of the comparison table, in model order; per-layer parts fold into their stack's row.
GROUPS = ["denoising", "backbone", "neck", "selector", "cascade gather/scatter", "encoder layers",
          "decoder layers", "model other", "heads", "matcher", "losses", "other"]


def part_modules(model):
  """(part, module) pairs of a detrex FOCUS_DETR model. Modules nest (the criterion holds the
  matcher, the encoder its layers): the innermost range wins."""
  t = model.transformer
  pairs = [("backbone", model.backbone), ("neck", model.neck), ("model other", t),
           ("model other", t.decoder), ("cascade gather/scatter", t.encoder)]
  pairs += [("selector", m) for m in (t.enc_output, t.enc_output_norm, t.enc_mask_predictor)]
  pairs += [(f"encoder_layers_{i}", m) for i, m in enumerate(t.encoder.layers)]
  pairs += [(f"decoder_layers_{i}", m) for i, m in enumerate(t.decoder.layers)]
  pairs += [("heads", m) for m in [*model.class_embed, *model.bbox_embed,
                                   t.decoder.ref_point_head, t.decoder.norm]]
  pairs += [("losses", model.criterion), ("matcher", model.criterion.matcher)]
  return pairs


def add_part_ranges(model, record_function):
  """Opens a `part:<name>` range around every call of `part_modules(model)` (forward hooks)
  and of the denoising methods (`prepare_for_cdn`, `dn_post_process`: plain methods, wrapped
  on the instance). Returns a function that removes them all."""
  handles, seen = [], set()
  for part, module in part_modules(model):
    if id(module) in seen:  # shared modules (enhance_MCSP is class_embed[-1]): one range
      continue
    seen.add(id(module))
    stack = []  # a stack: a module may run inside its own range (recursion-safe)

    def pre(mod, args, name="part:" + part, stack=stack):
      stack.append(record_function(name))
      stack[-1].__enter__()

    def post(mod, args, out, stack=stack):
      stack.pop().__exit__(None, None, None)
    handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
  methods = ("prepare_for_cdn", "dn_post_process")
  for name in methods:
    def wrapped(*a, method=getattr(model, name), **k):
      with record_function("part:denoising"):
        return method(*a, **k)
    setattr(model, name, wrapped)

  def remove():
    for h in handles:
      h.remove()
    for name in methods:
      delattr(model, name)   # the class's method shows through again
  return remove


def plain_events(function_events):
  """torch `FunctionEvent`s -> dicts: name, thread, start_us, end_us, parent (index in the list
  or None), seq (autograd sequence number, -1 if none), fwd_thread (of a backward node)."""
  evs = [e for e in function_events if not e.is_async]
  index = {e.id: i for i, e in enumerate(evs)}
  return [dict(name=e.name, thread=e.thread, start_us=e.time_range.start,
               end_us=e.time_range.end, seq=e.sequence_nr, fwd_thread=e.fwd_thread,
               parent=index.get(e.cpu_parent.id) if e.cpu_parent is not None else None)
          for e in evs]


def attribute(events):
  """Self seconds per "<fwd|bwd> <part>" of a profiled train step (see the module docstring).

  `events`: dicts as from `plain_events`; the step's forward inside a `step:forward` range and
  its backward inside `step:backward` (events outside both count as forward). Returns dict:
  seconds {"fwd backbone": s, ...}, total_s (sum of all self times = the roots' durations),
  nearest_bwd_s (backward nodes placed by the nearest lower number), unmatched_bwd_s (backward
  nodes with no recorded number at or below theirs: in `bwd other`), thread_s {thread: s}.
  """
  ctx = [None] * len(events)   # per event: (part, in backward, index of its backward node)

  def context(i):
    if ctx[i] is None:
      e = events[i]
      p = e["parent"]
      part, bwd, node = context(p) if p is not None else ("other", False, None)
      if e["name"].startswith("part:"):
        part = e["name"][len("part:"):]
      elif e["name"] == "step:backward":
        bwd = True
      elif e["name"].startswith(BACKWARD_NODE):
        bwd, node = True, i
      ctx[i] = (part, bwd, node)
    return ctx[i]

  children_us = collections.Counter()
  creator = {}  # (thread, seq) -> (start_us, part) of the last forward event recording it
  for i, e in enumerate(events):
    if e["parent"] is not None:
      children_us[e["parent"]] += e["end_us"] - e["start_us"]
    part, bwd, _ = context(i)
    key = (e["thread"], e["seq"])
    if not bwd and e["seq"] >= 0 and (key not in creator or creator[key][0] <= e["start_us"]):
      creator[key] = (e["start_us"], part)
  numbers = collections.defaultdict(list)   # thread -> sorted recorded sequence numbers
  for thread, seq in sorted(creator):
    numbers[thread].append(seq)

  def forward_part(thread, seq):
    """(part, exact) of the forward op that made node `seq`; part None when none did."""
    if (thread, seq) in creator:
      return creator[(thread, seq)][1], True
    j = bisect.bisect_right(numbers[thread], seq) - 1
    return (creator[(thread, numbers[thread][j])][1] if j >= 0 else None), False

  seconds, thread_s = collections.Counter(), collections.Counter()
  nearest = unmatched = 0.0
  for i, e in enumerate(events):
    self_s = (e["end_us"] - e["start_us"] - children_us[i]) / 1e6
    part, bwd, node = ctx[i]
    if bwd:
      part = None
      if node is not None and events[node]["seq"] >= 0:
        part, exact = forward_part(events[node]["fwd_thread"], events[node]["seq"])
        nearest += self_s if part is not None and not exact else 0.0
        unmatched += self_s if part is None else 0.0
      part = part or "other"
    seconds[f"{'bwd' if bwd else 'fwd'} {part}"] += self_s
    thread_s[e["thread"]] += self_s
  return dict(seconds=dict(seconds), total_s=sum(seconds.values()), nearest_bwd_s=nearest,
              unmatched_bwd_s=unmatched, thread_s={str(k): v for k, v in thread_s.items()})


def profile_step(torch, model, step):
  """Runs `step(record_function)` (one train step: zero_grad, forward in a `step:forward`
  range, backward in `step:backward`) once under the torch profiler with the part ranges on;
  returns `attribute`'s dict plus profiled_step_s (wall seconds of the profiled step).
  `torch` is passed in: this module imports no torch (the tests run without it)."""
  remove = add_part_ranges(model, torch.profiler.record_function)
  try:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
      t0 = time.perf_counter()
      step(torch.profiler.record_function)
      wall = time.perf_counter() - t0
  finally:
    remove()
  return dict(attribute(plain_events(prof.events())), profiled_step_s=wall)


def group(part):
  """Row of GROUPS that a part of ours (`profiling.classify`) or detrex's folds into."""
  if re.fullmatch(r"(encoder|decoder)_layers_\d+", part):
    return part.split("_")[0] + " layers"
  if part in ("cascade gather", "cascade scatter"):
    return "cascade gather/scatter"
  return part if part in GROUPS else "other"   # ours' "runtime": the XLA executor


def grouped(seconds):
  """{"<dir> <part>": s} -> {(dir, group): s}; ours' "-" direction (runtime) counts as fwd."""
  out = collections.Counter()
  for key, s in seconds.items():
    d, part = key.split(" ", 1)
    out[("bwd" if d == "bwd" else "fwd", group(part))] += s
  return out


def markdown(detrex, ours=None):
  """The comparison table (detrex's `attribute` dict plus profiled_step_s; ours: a row of
  profile_train.py's JSON with wall_by_part / idle_s, or None), then the per-layer split."""
  cols = ["detrex fwd s", "detrex bwd s"] + (["ours fwd s", "ours bwd s"] if ours else [])
  sides = [detrex["seconds"]] + ([ours["wall_by_part"]] if ours else [])
  groups = [grouped(side) for side in sides]
  out = table(["part"] + cols, [[g] + [f"{side[(d, g)]:.2f}" for side in groups
                                       for d in ("fwd", "bwd")] for g in GROUPS])
  tot = [sum(v for (k, _), v in side.items() if k == d) for side in groups for d in ("fwd", "bwd")]
  out.append("| **parts total** | " + " | ".join(f"**{v:.2f}**" for v in tot) + " |")
  if ours:  # all XLA worker threads idle: wall time that no part owns, in neither direction
    out.append(f"| all XLA workers idle | | | {ours['idle_s']:.2f} | |")
    out.append(f"| **step (fwd + bwd + idle)** | **{tot[0] + tot[1]:.2f}** | | "
               f"**{tot[2] + tot[3] + ours['idle_s']:.2f}** | |")
  out += ["", f"detrex: profiled step {detrex['profiled_step_s']:.2f} s wall, "
          f"{detrex['total_s']:.2f} s attributed; backward nodes placed by the nearest lower "
          f"sequence number {detrex['nearest_bwd_s']:.3f} s, with no forward op "
          f"{detrex['unmatched_bwd_s']:.3f} s; seconds per thread {detrex['thread_s']}", ""]
  layers = []   # each stack's layers 0, 1, ... as far as detrex's forward has them
  for stack in ("encoder", "decoder"):
    layers += itertools.takewhile(lambda k: f"fwd {k}" in sides[0],
                                  (f"{stack}_layers_{i}" for i in itertools.count()))
  out += table(["layer"] + cols, [[k] + [f"{side.get(f'{d} {k}', 0.0):.3f}" for side in sides
                                         for d in ("fwd", "bwd")] for k in layers])
  return "\n".join(out) + "\n"
