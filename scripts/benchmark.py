"""Model benchmark: eval latency/throughput, train step, compile time, memory, FLOPs split,
keep-ratio sweep against a dense encoder, bf16 vs float32. R50 and Swin-T.

Every measurement runs in its own subprocess (clean compile caches and a per-measurement peak
RSS), one after the other (`--in-process`, implied by `--smoke`: all in this process). Timings on a shared machine are noisy: each run measures its own
baseline, a plain jitted R50 backbone at 800x1333 (decisions §11 measured 1.14 s there), and
reports every latency also as a ratio to it. Weights are random (timing and FLOPs do not depend
on them).

  PYTHONPATH=. .venv/bin/python scripts/benchmark.py --smoke            # ~1 min, tiny model
  PYTHONPATH=. .venv/bin/python scripts/benchmark.py                    # default (~20-25 min
                                                                        # on a busy 2-core CPU)
  PYTHONPATH=. .venv/bin/python scripts/benchmark.py --parts eval,flops --configs swin_t
  PYTHONPATH=. .venv/bin/python scripts/benchmark.py --parts sweep --sweep-size 512x768
  PYTHONPATH=. .venv/bin/python scripts/benchmark.py --eval-batches 1,8  # adds batch 8 (slow)
  PYTHONPATH=. .venv/bin/python scripts/benchmark.py --eval-cells 800x1333:1,512x768:8
  PYTHONPATH=. .venv/bin/python scripts/benchmark.py --dry-run ...     # list the measurements

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

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from focus_detr_jax import cli  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIGS = {"r50": "focus_detr_r50_4scale_12ep", "swin_t": "focus_detr_swin_tiny_224_4scale_12ep",
           "tiny": "tiny"}


# ----------------------------------------------------------------------------- worker side


def _build(spec):
  """(config, model) for a task spec, with its model overrides applied.

  Override keys may be dotted ("backbone.depth"). Values "ones" (cascade: 1.0 for every encoder
  layer) and "dense" (focus_rho: `dense_rho` of the spec's input size) resolve against the
  config.
  """
  import importlib
  from focus_detr_jax.models.focus_detr import FocusDETR, feature_level_shapes
  config = importlib.import_module(f"configs.{CONFIGS[spec['config']]}").get_config()
  for key, value in spec.get("model", {}).items():
    if key == "cascade" and value == "ones":
      value = (1.0,) * config.model.num_encoder_layers
    elif key == "focus_rho" and value == "dense":
      value = dense_rho(sum(h * w for h, w in feature_level_shapes(spec["height"],
                                                                  spec["width"])))
    node = config.model
    *parents, leaf = key.split(".")
    for name in parents:
      node = getattr(node, name)
    setattr(node, leaf, tuple(value) if isinstance(value, list) else value)
  return config, FocusDETR.from_config(config.model)


def random_variables(model, height=256, width=256, seed=0):
  """Variables with the init's structure, filled cheaply (no init compile at full size).

  Matrices ~ N(0, 0.02); norm scales and FrozenBN weight/variance 1; other vectors 0.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, height, width, 3)),
                                             jnp.zeros((1, height, width), bool)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    last = name.rsplit("/", 1)[-1]
    if last in ("scale", "running_var") or (name.startswith("frozen") and last == "weight"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if len(leaf.shape) >= 2 or last in ("alpha",):
      return jnp.asarray(rng.normal(scale=0.02, size=leaf.shape), leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _inputs(batch, height, width, seed=0):
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(batch, height, width, 3)).astype(np.float32))
  mask = jnp.zeros((batch, height, width), bool)
  size = jnp.asarray([[height, width]] * batch, jnp.int32)
  return images, mask, size


def _backbone_neck(module, images):
  return module.neck(module.backbone_net(images.astype(module.dtype), train=False))


def task_baseline(spec):
  """Same-run machine baseline: jitted backbone (no neck; R50 by default) forward, batch 1."""
  import jax
  from focus_detr_jax import benchmarking as bm
  _, model = _build(dict(spec, config=spec.get("config", "r50")))
  variables = random_variables(model)
  images, _, _ = _inputs(1, spec["height"], spec["width"])
  fn = jax.jit(lambda v, x: model.apply(v, x, method=lambda m, x: m.backbone_net(
      x, train=False)))
  compiled, lower_s, compile_s = bm.compile_jitted(fn, variables, images)
  timing = bm.time_calls(compiled, variables, images, repeats=spec.get("repeats", 3))
  return dict(compile_s=lower_s + compile_s, flops=bm.cost_flops(compiled), **timing,
              memory=bm.peak_memory())


def task_eval(spec):
  """Eval forward + postprocess: latency, throughput, compile, FLOPs, memory (+ FLOPs split)."""
  import jax
  import jax.numpy as jnp
  from focus_detr_jax import benchmarking as bm
  from focus_detr_jax import export
  from focus_detr_jax.models import deformable_attention as da
  from focus_detr_jax.models import token_selection
  from focus_detr_jax.models.focus_detr import feature_level_shapes
  if spec.get("msda"):
    da.set_implementation(spec["msda"])
  config, model = _build(spec)
  b, h, w = spec["batch"], spec["height"], spec["width"]
  n = sum(hh * ww for hh, ww in feature_level_shapes(h, w))
  result = dict(num_tokens=n, msda=da.resolve_implementation(),
                capacities=list(token_selection.cascade_capacities(
                    n, model.focus_rho, model.cascade)))
  variables = random_variables(model)
  images, mask, size = _inputs(b, h, w)
  infer = jax.jit(export.inference_function(model, config.model.num_select))
  compiled, lower_s, compile_s = bm.compile_jitted(infer, variables, images, mask, size)
  result.update(lower_s=lower_s, compile_s=compile_s, flops=bm.cost_flops(compiled))
  if spec.get("time", True):
    timing = bm.time_calls(compiled, variables, images, mask, size,
                           repeats=spec.get("repeats", 3), max_seconds=spec.get("max_seconds"))
    result.update(timing, images_per_s=b / timing["median_s"])
  if spec.get("split"):
    bb = jax.jit(lambda v, x: model.apply(v, x, method=_backbone_neck))
    bb_compiled, _, _ = bm.compile_jitted(bb, variables, images)
    memory = jnp.zeros((b, n, model.hidden_dim), jnp.float32)

    def no_encoder(v, x, m, s, mem):
      out = model.apply(v, x, m, train=False, forced={"memory": mem})
      from focus_detr_jax.models.postprocess import postprocess
      return postprocess(out["pred_logits"], out["pred_boxes"], s,
                         num_select=config.model.num_select)
    ne_compiled, _, _ = bm.compile_jitted(jax.jit(no_encoder), variables, images, mask, size,
                                          memory)
    result["flops_backbone_neck"] = bm.cost_flops(bb_compiled)
    result["flops_decoder_part"] = bm.cost_flops(ne_compiled)
    if spec.get("time_parts", True):
      result["backbone_neck_median_s"] = bm.time_calls(
          bb_compiled, variables, images, repeats=spec.get("repeats", 3))["median_s"]
      result["decoder_part_median_s"] = bm.time_calls(
          ne_compiled, variables, images, mask, size, memory,
          repeats=spec.get("repeats", 3))["median_s"]
  result["memory"] = bm.peak_memory()
  return result


def _train_batch(config, batch, height, width, boxes_per_image=8, seed=0):
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  m = config.data.max_boxes
  images, mask, size = _inputs(batch, height, width, seed)
  boxes = np.zeros((batch, m, 4), np.float32)
  boxes[:, :, :2] = rng.uniform(0.2, 0.8, size=(batch, m, 2))
  boxes[:, :, 2:] = rng.uniform(0.05, 0.3, size=(batch, m, 2))
  labels = rng.integers(0, config.model.num_classes, size=(batch, m)).astype(np.int32)
  valid = np.zeros((batch, m), bool)
  valid[:, :boxes_per_image] = True
  return dict(image=images, padding_mask=mask, boxes=jnp.asarray(boxes),
              labels=jnp.asarray(labels), box_valid=jnp.asarray(valid), image_size=size)


def task_train(spec):
  """loss + grad of `model_loss` (train mode, denoising on): step time, compile, FLOPs, memory."""
  import jax
  from focus_detr_jax import benchmarking as bm
  from focus_detr_jax.models import deformable_attention as da
  from focus_detr_jax.train.objective import model_loss
  if spec.get("msda"):
    da.set_implementation(spec["msda"])
  config, model = _build(spec)
  variables = random_variables(model)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  batch = _train_batch(config, spec["batch"], spec["height"], spec["width"])

  def loss_and_grad(params, batch, key):
    return jax.value_and_grad(
        lambda p: model_loss(model, p, extra, batch, config, key=key)[0])(params)

  key = jax.random.PRNGKey(0)
  compiled, lower_s, compile_s = bm.compile_jitted(jax.jit(loss_and_grad), params, batch, key)
  timing = bm.time_calls(compiled, params, batch, key, repeats=spec.get("repeats", 3),
                         max_seconds=spec.get("max_seconds"))
  loss, _ = compiled(params, batch, key)
  return dict(msda=da.resolve_implementation(), lower_s=lower_s, compile_s=compile_s,
              flops=bm.cost_flops(compiled), loss=float(loss), **timing,
              memory=bm.peak_memory())


TASKS = dict(baseline=task_baseline, eval=task_eval, train=task_train)


def worker(spec_json):
  import jax
  spec = json.loads(spec_json)
  jax.config.update("jax_enable_compilation_cache", False)
  t0 = time.perf_counter()
  result = TASKS[spec["task"]](spec)
  result["worker_s"] = time.perf_counter() - t0
  print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver side


_RESULT_CACHE = {}


def _model_key(spec):
  """What an eval measurement depends on: task, input shape, msda and the resolved model config."""
  config, _ = _build(spec)
  return json.dumps([spec["task"], spec["batch"], spec["height"], spec["width"],
                     spec.get("msda"), config.model.to_json(sort_keys=True)])


def run_cached(spec, runner):
  """`runner(spec)`, except that an eval whose resolved model, input and options equal an
  earlier one's (e.g. the sweep's default row and the eval cell of the same size) reuses that
  result instead of compiling and timing the same program again (`--in-process` only)."""
  if spec["task"] != "eval":
    return runner(spec)
  key = _model_key(spec)
  cached = _RESULT_CACHE.get(key)
  if (cached is not None and (cached["spec"].get("split") or not spec.get("split"))
      and ("median_s" in cached or not spec.get("time", True))):
    return dict(cached, spec=spec, reused_from=cached["spec"], wall_s=0.0)
  result = runner(spec)
  if "error" not in result:
    _RESULT_CACHE[key] = result
  return result


def run_task_in_process(spec):
  """Runs one task in this process (`--smoke`): no per-measurement RSS, shared caches."""
  import traceback
  from focus_detr_jax.models import deformable_attention as da
  t0 = time.perf_counter()
  previous = da.get_implementation()
  try:
    result = TASKS[spec["task"]](spec)
  except Exception:  # reported like a failed subprocess
    return dict(spec=spec, error=traceback.format_exc()[-2000:],
                wall_s=time.perf_counter() - t0)
  finally:
    da.set_implementation(previous)
  result["worker_s"] = time.perf_counter() - t0
  result.update(spec=spec, wall_s=time.perf_counter() - t0)
  return result


def run_task(spec, timeout):
  """Runs one task in a fresh process; returns its result dict (or an error entry)."""
  t0 = time.perf_counter()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             TF_CPP_MIN_LOG_LEVEL="3")
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
  except subprocess.TimeoutExpired:
    return dict(spec=spec, error=f"timeout after {timeout}s", wall_s=time.perf_counter() - t0)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      result = json.loads(line[len("RESULT "):])
      result.update(spec=spec, wall_s=time.perf_counter() - t0)
      return result
  return dict(spec=spec, error=(proc.stderr or proc.stdout)[-2000:],
              wall_s=time.perf_counter() - t0)


def _size(text):
  h, w = text.lower().split("x")
  return int(h), int(w)


def dense_rho(num_tokens):
  """focus_rho giving T = K_l = N (every token updated, as DINO's encoder).

  focus_rho = 1.0 would give T = int(N * 1.0) + 1 = N + 1 > N and top_k fails; (N - 0.5) / N
  gives int(N - 0.5) + 1 = N.
  """
  return (num_tokens - 0.5) / num_tokens


SWEEP = (  # name, cascade ("ones": 1.0 per layer, None: the config's), focus_rho
    ("dense (DINO-like, K_l = N)", "ones", "dense"),
    ("rho 0.5, cascade 1 per layer", "ones", 0.5),
    ("rho 0.5, config cascade (default)", None, 0.5),
    ("rho 0.3, config cascade", None, 0.3),
)


def plan(args):
  """The list of (part, label, spec) to run, baseline first."""
  tasks = _plan(args)
  overrides = json.loads(args.model_overrides)
  if overrides:
    for _, _, spec in tasks:
      spec["model"] = {**overrides, **spec.get("model", {})}
  return tasks


def _plan(args):
  tasks = []
  bh, bw = _size(args.baseline_size)
  tasks.append(("baseline", f"{args.baseline_config} backbone",
                dict(task="baseline", config=args.baseline_config, height=bh, width=bw,
                     repeats=args.repeats)))
  parts = set(args.parts.split(","))
  configs = args.configs.split(",")
  cells = [(_size(s), int(b)) for s in args.eval_sizes.split(",")
           for b in args.eval_batches.split(",")]
  if args.eval_cells:
    cells = [(_size(c.split(":")[0]), int(c.split(":")[1])) for c in args.eval_cells.split(",")]
  fh, fw = _size(args.flops_size)
  for cfg in configs:
    for (h, w), b in cells:
      if "eval" not in parts and not ("flops" in parts and (h, w) == (fh, fw) and b == 1):
        continue
      split = "flops" in parts and (h, w) == (fh, fw) and b == 1
      tasks.append(("eval", f"{cfg} {h}x{w} b{b}",
                    dict(task="eval", config=cfg, batch=b, height=h, width=w, split=split,
                         time="eval" in parts, repeats=args.repeats)))
    if "flops" in parts and ((fh, fw), 1) not in cells:
      tasks.append(("eval", f"{cfg} {fh}x{fw} b1", dict(task="eval", config=cfg, batch=1,
                                                       height=fh, width=fw, split=True,
                                                       time=False)))
  if "train" in parts:
    th, tw = _size(args.train_size)
    for cfg in args.train_configs.split(","):
      for impl in args.train_msda.split(","):
        tasks.append(("train", f"{cfg} {th}x{tw} b{args.train_batch} msda={impl}",
                      dict(task="train", config=cfg, batch=args.train_batch, height=th,
                           width=tw, msda=impl, repeats=min(args.repeats, 2),
                           max_seconds=60)))
  if "sweep" in parts:
    sh, sw = _size(args.sweep_size)
    # The cascade-independent FLOPs (backbone+neck, decoder part) come from the dense row's
    # split, or from an eval split of the same config and size when there is one.
    have_split = any(spec.get("split") and spec["config"] == args.sweep_config
                     and (spec["height"], spec["width"]) == (sh, sw)
                     for _, _, spec in tasks)
    settings = [int(i) for i in args.sweep_settings.split(",")]
    if settings[0] != 0:
      raise ValueError("--sweep-settings must start with 0 (the dense baseline row)")
    for i in settings:
      name, cascade, rho = SWEEP[i]
      model = dict(focus_rho=rho)
      if cascade is not None:
        model["cascade"] = cascade
      tasks.append(("sweep", name, dict(task="eval", config=args.sweep_config, batch=1,
                                        height=sh, width=sw, split=(i == 0 and not have_split),
                                        time_parts=False, repeats=args.repeats, model=model)))
  if "bf16" in parts:
    h, w = _size(args.bf16_size)
    for dtype in ("float32", "bfloat16"):
      tasks.append(("bf16", f"{args.bf16_config} {h}x{w} b1 {dtype}",
                    dict(task="eval", config=args.bf16_config, batch=1, height=h, width=w,
                         repeats=args.repeats, model=dict(dtype=dtype))))
  return tasks


# `--smoke`: configs/tiny.py shrunk further (ResNet-26 body, 1 decoder layer) at 64x64, one
# repeat, in this process: eval (batch 1, with the FLOPs split) and a 2-row sweep (dense,
# default). Compiles dominate (~1 min on a loaded 2-core machine); add
# `--parts eval,flops,sweep,train,bf16` to exercise the train step (its compile alone takes ~2
# min there) and the bf16 comparison too.
SMOKE = dict(parts="eval,flops,sweep", configs="tiny", eval_sizes="64x64", eval_batches="1",
             flops_size="64x64", baseline_size="64x64", baseline_config="tiny",
             train_configs="tiny", train_size="64x64", train_batch=2, train_msda="auto",
             sweep_size="64x64", sweep_config="tiny", sweep_settings="0,2", bf16_size="64x64",
             bf16_config="tiny", repeats=1, in_process=True,
             model_overrides='{"num_decoder_layers": 1, "backbone.depth": 26}')


def _g(x):
  return None if x is None else x / 1e9


def report(args, info, results, command, in_process=False):
  """Markdown of all parts (appendable to BENCHMARKS.md under '## Model benchmark')."""
  from focus_detr_jax import benchmarking as bm
  base = next((r for p, _, r in results if p == "baseline" and "median_s" in r), None)
  base_s = base["median_s"] if base else None
  base_spec = base["spec"] if base else {}
  base_cfg = {"r50": "R50", "swin_t": "Swin-T"}.get(base_spec.get("config", "r50"),
                                                    base_spec.get("config", "r50"))
  base_size = f"{base_spec.get('height')}x{base_spec.get('width')}"
  kinds = {r["memory"]["kind"] for _, _, r in results if "memory" in r}
  if kinds == {"device_peak_bytes_in_use"}:
    memory_note = "Peak memory is the device allocator's peak bytes in use."
  elif in_process:
    memory_note = ("Peak memory is the peak RSS of the whole process (`--in-process`: all "
                   "measurements share it, so it is cumulative).")
  else:
    memory_note = ("Peak memory is the peak RSS of the measurement's own process (CPU has no "
                   "device allocator stats) and includes ~0.3-0.5 GiB of Python/JAX.")
  out = [f"### Run {info['date']}", "",
         f"Machine: {info['nproc']} cores, {info['cpu']}; backend {info['backend']}; jax "
         f"{info['jax']}, flax {info['flax']}. Command: `{command}`.", "",
         f"Same-run baseline: jitted {base_cfg} backbone (no neck) at {base_size}, batch 1: "
         + (f"**{base_s:.3f} s** median (compile {base['compile_s']:.1f} s, "
            f"{_g(base['flops']):.1f} GFLOPs)" if base else "failed")
         + ". `x baseline` = latency / baseline latency (compare runs by this ratio). "
         + memory_note + " FLOPs are XLA cost analysis (2 per multiply-add). Weights are "
         "random.", ""]
  errors = [(p, label, r) for p, label, r in results if "error" in r]

  def ratio(r):
    return r["median_s"] / base_s if base_s and r.get("median_s") else None

  evals = [dict(label=label, **r) for p, label, r in results if p == "eval" and "error" not in r]
  timed = [r for r in evals if "median_s" in r]
  if timed:
    for r in timed:
      r["x_base"] = ratio(r)
      r["gflops"] = _g(r["flops"])
      r["mem_gib"] = r["memory"]["mib"] / 1024
      r["compile_total_s"] = r["lower_s"] + r["compile_s"]
    out += ["#### Eval forward (model apply + postprocess, jitted)", "",
            bm.markdown_table(timed, [
                ("label", "config size batch", ""), ("median_s", "latency median s", ".3f"),
                ("min_s", "min s", ".3f"), ("images_per_s", "images/s", ".3f"),
                ("x_base", "x baseline", ".2f"), ("compile_total_s", "trace+compile s", ".1f"),
                ("gflops", "GFLOPs", ".1f"), ("mem_gib", "peak mem GiB", ".2f"),
                ("msda", "MSDA", "")]), ""]
  splits = [r for r in evals if r.get("flops_decoder_part")]
  if splits:
    rows = []
    for r in splits:
      full, dec, bb = r["flops"], r["flops_decoder_part"], r["flops_backbone_neck"]
      enc = full - dec - bb
      row = dict(label=r["label"], full=_g(full), bb=_g(bb), enc=_g(enc), dec=_g(dec),
                 bb_pct=100 * bb / full, enc_pct=100 * enc / full, dec_pct=100 * dec / full)
      if r.get("decoder_part_median_s") and r.get("median_s"):
        bb_s, dec_s = r["backbone_neck_median_s"], r["decoder_part_median_s"]
        row.update(bb_s=bb_s, dec_s=dec_s, enc_s=r["median_s"] - bb_s - dec_s,
                   all_s=r["median_s"])
      rows.append(row)
    out += ["#### FLOPs and latency split (eval, batch 1)", "",
            "backbone+neck and the decoder part (eval forward with `memory` given as input: "
            "XLA drops backbone, neck, foreground scoring, cascade and encoder as dead code; "
            "left: two-stage selection, decoder, heads, post-processing) are compiled and timed "
            "on their own; encoder part = full - both (foreground scoring, cascade top-k, 6 "
            "encoder layers, flattening and positions).", "",
            bm.markdown_table(rows, [
                ("label", "config size", ""), ("full", "total GFLOPs", ".1f"),
                ("bb", "backbone+neck", ".1f"), ("bb_pct", "%", ".0f"),
                ("enc", "encoder part", ".1f"), ("enc_pct", "%", ".0f"),
                ("dec", "decoder part", ".1f"), ("dec_pct", "%", ".0f"),
                ("all_s", "full s", ".3f"), ("bb_s", "backbone+neck s", ".3f"),
                ("enc_s", "encoder part s", ".3f"), ("dec_s", "decoder part s", ".3f")]), ""]
  trains = [dict(label=label, **r) for p, label, r in results if p == "train" and "error" not in r]
  if trains:
    for r in trains:
      r["x_base"] = ratio(r)
      r["gflops"] = _g(r["flops"])
      r["mem_gib"] = r["memory"]["mib"] / 1024
      r["compile_total_s"] = r["lower_s"] + r["compile_s"]
    ref = trains[0]["median_s"]
    for r in trains:
      r["vs_first"] = ref / r["median_s"]
    out += ["#### Train step (value_and_grad of `model_loss`, denoising on, 8 boxes/image)", "",
            bm.markdown_table(trains, [
                ("label", "config size batch MSDA", ""), ("median_s", "step median s", ".2f"),
                ("min_s", "min s", ".2f"), ("x_base", "x baseline", ".2f"),
                ("vs_first", "speed-up vs first row", ".2f"),
                ("compile_total_s", "trace+compile s", ".1f"), ("gflops", "GFLOPs", ".1f"),
                ("mem_gib", "peak mem GiB", ".2f")]), ""]
  sweep = [dict(label=label, **r) for p, label, r in results if p == "sweep" and "error" not in r]
  if sweep:
    dense = sweep[0]
    fixed = None   # FLOPs that do not depend on the cascade: backbone+neck + decoder part
    source = dense if dense.get("flops_decoder_part") else next(
        (r for r in splits if r["spec"]["config"] == dense["spec"]["config"]
         and r["spec"]["height"] == dense["spec"]["height"]
         and r["spec"]["width"] == dense["spec"]["width"]
         and r["spec"].get("model", {}) == {k: v for k, v in dense["spec"].get("model", {}).items()
                                            if k not in ("cascade", "focus_rho")}), None)
    if source is not None:
      fixed = source["flops_decoder_part"] + source["flops_backbone_neck"]
    for r in sweep:
      r["gflops"] = _g(r["flops"])
      r["enc_gflops"] = _g(r["flops"] - fixed) if fixed else None
      r["flops_vs_dense"] = r["flops"] / dense["flops"]
      r["enc_vs_dense"] = (r["flops"] - fixed) / (dense["flops"] - fixed) if fixed else None
      r["lat_vs_dense"] = r["median_s"] / dense["median_s"] if r.get("median_s") else None
      r["x_base"] = ratio(r)
      r["caps"] = ",".join(str(c) for c in r["capacities"])
      if r.get("reused_from"):
        r["label"] += " [same program as an eval row: its measurement]"
    sp = dense["spec"]
    out += [f"#### Keep-ratio sweep ({sp['config']}, {sp['height']}x{sp['width']}, batch 1, "
            "eval)", "",
            f"N = {dense['num_tokens']} tokens; K_l = encoder tokens updated per layer. Dense = "
            "cascade 1.0 for every layer with focus_rho = (N - 0.5) / N so that K_l = N "
            "(focus_rho = 1.0 gives N + 1 and top_k fails). Baseline of this table: the dense "
            "row, same run.", "",
            bm.markdown_table(sweep, [
                ("label", "setting", ""), ("caps", "K_l per layer", ""),
                ("gflops", "total GFLOPs", ".1f"), ("flops_vs_dense", "vs dense", ".2f"),
                ("enc_gflops", "encoder part GFLOPs", ".1f"), ("enc_vs_dense", "vs dense", ".2f"),
                ("median_s", "latency s", ".3f"), ("lat_vs_dense", "vs dense", ".2f"),
                ("x_base", "x baseline", ".2f")]), ""]
  bf16 = [dict(label=label, **r) for p, label, r in results if p == "bf16" and "error" not in r]
  if bf16:
    for r in bf16:
      r["x_base"] = ratio(r)
      r["vs_f32"] = r["median_s"] / bf16[0]["median_s"]
      r["mem_gib"] = r["memory"]["mib"] / 1024
      r["compile_total_s"] = r["lower_s"] + r["compile_s"]
    out += ["#### bf16 vs float32 (eval)", "",
            bm.markdown_table(bf16, [
                ("label", "setting", ""), ("median_s", "latency s", ".3f"),
                ("vs_f32", "vs float32", ".2f"), ("x_base", "x baseline", ".2f"),
                ("compile_total_s", "trace+compile s", ".1f"),
                ("mem_gib", "peak mem GiB", ".2f")]), ""]
  if errors:
    out += ["#### Failed", ""] + [f"- {p} {label}: `{r['error'][-300:]}`"
                                   for p, label, r in errors] + [""]
  return "\n".join(out)


def define_flags(fv, argv):
  del argv
  s, i, b = flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_bool
  s("worker", None, "(internal) run one measurement spec (JSON) and print its result",
    flag_values=fv)
  s("parts", "eval,flops,train,sweep", "comma list of eval,flops,train,sweep,bf16 (baseline "
    "always runs)", flag_values=fv)
  s("configs", "r50,swin_t", f"of {sorted(CONFIGS)}", flag_values=fv)
  s("eval-sizes", "800x1333,512x768", "eval canvas sizes", flag_values=fv)
  s("eval-batches", "1", "eval batch sizes; 8 at 800x1333 takes ~1.5 min per config here",
    flag_values=fv)
  s("eval-cells", None, "explicit eval SIZE:BATCH list (e.g. 800x1333:1,512x768:8), instead of "
    "--eval-sizes x --eval-batches", flag_values=fv)
  s("flops-size", "800x1333", "", flag_values=fv)
  s("baseline-size", "800x1333", "", flag_values=fv)
  s("train-configs", "r50", "", flag_values=fv)
  s("train-size", "512x768", "", flag_values=fv)
  i("train-batch", 2, "", flag_values=fv)
  s("train-msda", "gather,auto", "deformable attention formulations to time the train step with",
    flag_values=fv)
  s("sweep-size", "800x1333", "", flag_values=fv)
  s("sweep-config", "r50", "", flag_values=fv)
  s("sweep-settings", ",".join(str(k) for k in range(len(SWEEP))), "indices into SWEEP (" +
    "; ".join(f"{k}: {n}" for k, (n, _, _) in enumerate(SWEEP)) + "); starts with 0",
    flag_values=fv)
  s("model-overrides", "{}", "JSON dict of config.model fields set in every measurement",
    flag_values=fv)
  s("bf16-size", "512x768", "", flag_values=fv)
  s("bf16-config", "r50", "", flag_values=fv)
  s("baseline-config", "r50", "", flag_values=fv)
  i("repeats", 3, "", flag_values=fv)
  i("timeout", 900, "per measurement, seconds", flag_values=fv)
  s("json", None, "write raw results here", flag_values=fv)
  s("markdown", None, "write the markdown report here", flag_values=fv)
  b("dry-run", False, "list the measurements and exit", flag_values=fv)
  s("report-from", None, "re-render the markdown of a --json file and exit", flag_values=fv)
  b("in-process", False, "run the measurements in this process (peak RSS is then the whole "
    "run's)", flag_values=fv)
  b("smoke", False, "quick check (configs/tiny.py, R26, 1 decoder layer, 64x64, 1 rep, in this "
    "process): baseline, eval with FLOPs split, 2-row sweep; sets every option left at its "
    "default (see SMOKE)", flag_values=fv)


def run(fv, positional):
  if positional:
    raise cli.UsageError(f"unexpected arguments {positional}")
  args = cli.namespace(fv, [n for n in fv if n != "debug"])
  if args.smoke:   # smoke values for every option left at its default
    for key, value in SMOKE.items():
      if getattr(args, key) == fv[key.replace("_", "-")].default:
        setattr(args, key, value)
  if args.worker:
    worker(args.worker)
    return
  from focus_detr_jax import benchmarking as bm
  if args.report_from:
    with open(args.report_from) as f:
      saved = json.load(f)
    results = [(r.pop("part"), r.pop("label"), r) for r in saved["results"]]
    print(report(args, saved["info"], results, saved.get("command", "(see --json)"),
                 in_process=saved.get("in_process", False)))
    return
  tasks = plan(args)
  if args.dry_run:
    for part, label, spec in tasks:
      print(part, label, json.dumps(spec))
    return
  info = bm.machine_info()
  results = []
  t_start = time.perf_counter()
  for part, label, spec in tasks:
    # In-process (`--smoke`) an identical eval program is measured once; in separate processes
    # every row is measured itself, close in time to its neighbours (the machine's load drifts).
    result = (run_cached(spec, run_task_in_process) if args.in_process
              else run_task(spec, args.timeout))
    results.append((part, label, result))
    brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()
             if k not in ("spec", "memory", "error")}
    print(f"[{time.perf_counter() - t_start:7.1f}s] {part} {label}: "
          + (f"ERROR {result['error'][-500:]}" if "error" in result else json.dumps(brief)),
          flush=True)
  command = "PYTHONPATH=. .venv/bin/python scripts/benchmark.py " + " ".join(
      a for a in sys.argv[1:])
  md = report(args, info, results, command.strip(), in_process=args.in_process)
  print(md)
  print(f"total {time.perf_counter() - t_start:.0f}s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(info=info, command=command.strip(), in_process=args.in_process,
                     results=[dict(part=p, label=l, **r) for p, l, r in results]), f, indent=1)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(md + "\n")


def main(argv=None):
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
