"""Deformable attention formulations timed against `gather` (`scripts/benchmark_msda.py`).

Inputs follow an 800x1333 image; every formulation is compiled first, then all are timed in
interleaved rounds (`time_interleaved`) so that load changes on a shared machine hit them alike.
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.benchmarks import measure as bm
from focus_detr_jax.models import deformable_attention as da
from focus_detr_jax.models.focus_detr import feature_level_shapes

SIZES = {"encoder": 11112, "decoder": 900}


def make_inputs(num_queries, height=800, width=1333, batch=1, heads=8, head_dim=32, points=4,
                seed=0):
  """Random values; locations = reference point + offsets of a few pixels (some off the map)."""
  shapes = feature_level_shapes(height, width)
  n = sum(h * w for h, w in shapes)
  levels = len(shapes)
  rng = np.random.default_rng(seed)
  value = rng.normal(size=(batch, n, heads, head_dim)).astype(np.float32)
  ref = rng.uniform(0.0, 1.0, size=(batch, num_queries, 1, 1, 1, 2))
  pixels = rng.normal(scale=3.0, size=(batch, num_queries, heads, levels, points, 2))
  normalizer = np.asarray([[w, h] for h, w in shapes], np.float64)[None, None, None, :, None, :]
  loc = (ref + pixels / normalizer).astype(np.float32)
  logits = rng.normal(size=(batch, num_queries, heads, levels * points))
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True)).reshape(
      batch, num_queries, heads, levels, points).astype(np.float32)
  return shapes, jnp.asarray(value), jnp.asarray(loc), jnp.asarray(weights)


def prepare(impl, shapes, value, loc, weights, backward):
  """Compiles forward (and value_and_grad) of one formulation and runs each once (warm-up):
  (row with compile times, {"fwd"/"fwdbwd": compiled}, output, grads)."""
  def forward(v, l, a):
    return da.ms_deform_attn(v, shapes, l, a, implementation=impl)

  cot = jnp.asarray(np.random.default_rng(1).normal(
      size=(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])).astype(np.float32))

  def loss(v, l, a):
    return jnp.sum(forward(v, l, a) * cot)

  row, programs, outputs = dict(implementation=impl), {}, {}
  fns = dict(fwd=forward, fwdbwd=jax.value_and_grad(loss, argnums=(0, 1, 2)))
  for kind in ["fwd", "fwdbwd"][:2 if backward else 1]:
    programs[kind], lower_s, compile_s = bm.compile_jitted(jax.jit(fns[kind]), value, loc, weights)
    row[f"{kind[-3:]}_compile_s"] = lower_s + compile_s
    outputs[kind] = bm.block(programs[kind](value, loc, weights))
  return row, programs, outputs["fwd"], outputs["fwdbwd"][1] if backward else None


def time_interleaved(programs, args, repeats, max_seconds):
  """{(impl, kind): [seconds, ...]}: every program once per round, in an order rotating each
  round; a program leaves the rounds after `repeats` calls or once its timed calls exceed
  `max_seconds` (it always gets at least one call)."""
  keys = list(programs)
  times = {k: [] for k in keys}
  for r in range(repeats):
    active = [k for k in keys if not times[k] or sum(times[k]) < max_seconds]
    if not active:
      break
    shift = r % len(active)
    for key in active[shift:] + active[:shift]:
      t0 = time.perf_counter()
      bm.block(programs[key](*args))
      times[key].append(time.perf_counter() - t0)
  return times


def run(args):
  """All sizes and formulations (`args`: the script's flags as attributes); (info, results)."""
  info = bm.machine_info()
  impls = args.implementations.split(",")
  if impls[0] != "gather":
    impls = ["gather"] + [i for i in impls if i != "gather"]   # the same-run baseline comes first
  results = {}
  for size in args.sizes.split(","):
    q = SIZES[size]
    shapes, value, loc, weights = make_inputs(q, batch=args.batch)
    rows, programs, base_out, base_grads = [], {}, None, None
    t_size = time.perf_counter()
    for impl in impls:
      if impl == "onehot_matmul" and size == "encoder" and args.skip_onehot_encoder:
        rows.append(dict(implementation=impl, note="skipped (--skip-onehot-encoder)"))
        continue
      t0 = time.perf_counter()
      row, progs, out, grads = prepare(impl, shapes, value, loc, weights,
                                       not args.forward_only)
      programs.update({(impl, kind): prog for kind, prog in progs.items()})
      if base_out is None:
        base_out, base_grads = out, grads
      row["max_abs_diff_vs_gather"] = float(jnp.max(jnp.abs(out - base_out)))
      if grads is not None:
        row["grad_rel_diff_vs_gather"] = max(
            bm.relative_max_diff(g, bg) for g, bg in zip(grads, base_grads))
      rows.append(row)
      print(f"[{size} Q={q}] {impl} compiled + warm-up: {json.dumps(row)} "
            f"({time.perf_counter() - t0:.1f}s)", flush=True)
    del out, grads
    times = time_interleaved(programs, (value, loc, weights), args.repeats, args.max_seconds)
    for row in rows:
      for kind in ("fwd", "fwdbwd"):
        ts = times.get((row["implementation"], kind))
        if ts:
          row.update({f"{kind}_median_s": float(np.median(ts)), f"{kind}_min_s": min(ts),
                      f"{kind}_calls": len(ts)})
      print(f"[{size} Q={q}] {json.dumps(row)}", flush=True)
      for kind in ("fwd", "fwdbwd"):   # rows[0], gather, has its medians by now
        if row.get(f"{kind}_median_s") and rows[0].get(f"{kind}_median_s"):
          row[f"{kind}_speedup"] = rows[0][f"{kind}_median_s"] / row[f"{kind}_median_s"]
    results[size] = dict(num_queries=q, num_tokens=int(value.shape[1]), rows=rows,
                         wall_s=time.perf_counter() - t_size)
  return info, results


def to_markdown(info, results, command):
  """One table per size (columns without any value left out)."""
  cols = [("implementation", "formulation", ""), ("fwd_median_s", "fwd median s", ".4f"),
          ("fwd_min_s", "fwd min s", ".4f"), ("fwd_speedup", "fwd vs gather", ".2f"),
          ("fwdbwd_median_s", "fwd+bwd median s", ".4f"), ("fwdbwd_min_s", "fwd+bwd min s", ".4f"),
          ("fwdbwd_speedup", "fwd+bwd vs gather", ".2f"), ("fwd_compile_s", "compile fwd s", ".2f"),
          ("bwd_compile_s", "compile fwd+bwd s", ".2f"),
          ("max_abs_diff_vs_gather", "max abs diff vs gather", ".1e"),
          ("grad_rel_diff_vs_gather", "max rel grad diff", ".1e"), ("note", "note", "")]
  lines = [f"Run {info['date']}; machine: {info['nproc']} cores ({info['cpu']}), backend "
           f"{info['backend']}, jax {info['jax']}. Command: `{command}`. Baseline: `gather` "
           "in the same run; `vs gather` = gather median / formulation median (> 1 is "
           "faster); timed in interleaved rounds after compiling all formulations.", ""]
  for size, res in results.items():
    used = [c for c in cols if any(row.get(c[0]) is not None for row in res["rows"])]
    lines += [f"**{size}**: {res['num_queries']} queries over {res['num_tokens']} tokens "
              "(B=1, 8 heads x 32, 4 levels x 4 points)", "",
              bm.markdown_table(res["rows"], used), ""]
  return "\n".join(lines)
