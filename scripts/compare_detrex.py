"""Same-run speed comparison with the official detrex Focus-DETR (PyTorch CPU).

Measures, in this order and one process each: detrex, ours, detrex again, so that a change of
machine load shows up as a difference between the two detrex runs instead of a false ratio.
Parts: `eval` (eval forward, batch 1, per size: detrex `model.eval()` under `no_grad`; ours the
jitted inference function of scripts/benchmark.py) and `train` (one train step's forward +
backward, R50, denoising on, `--boxes` boxes per image: detrex `sum(loss_dict).backward()` in
`model.train()`; ours `value_and_grad` of `model_loss`). Ratio = detrex median (the faster of its
two runs, the conservative choice) / ours: > 1 means ours is faster. Medians of `--repeats`
calls after warm-up calls (detrex 2, ours 1 after the compile).

detrex runs in its own Python (`--detrex-python`, an environment with torch, detectron2 and
detrex installed, see docs/reproducibility.md); this script only imports it there. Both sides
use 2 threads by default, the parity weight rule (parity/README §4) for detrex and random
weights for ours (timing does not depend on the values: static shapes, all tokens valid).

  PYTHONPATH=. .venv/bin/python scripts/compare_detrex.py --detrex-python /path/venv/bin/python \
      --detrex-root /path/detrex --json /tmp/cmp.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "projects/focus_detr/configs/focus_detr_resnet/focus_detr_r50_4scale_12ep.py"


def _size(text):
  h, w = text.split("x")
  return int(h), int(w)


# ----------------------------------------------------------------------------- detrex side
# Runs under --detrex-python: imports only numpy, torch, detectron2, detrex and the recorder.


def detrex_worker(spec):
  sys.path.insert(0, REPO)
  import numpy as np
  from focus_detr_jax.reference import recorder
  torch = recorder.configure_cpu(threads=spec["threads"], capability=None)
  model, _, dn_number = recorder.build_model(spec["config"], spec["detrex_root"])
  recorder.apply_weight_rule(model, recorder.manifest_rows(model), seed=0)
  rng = np.random.default_rng(0)
  results = {}

  def timed(fn, repeats):
    for _ in range(2):  # warm-up: a single call left torch's first timed calls 2-4x slower
      fn()
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    return dict(median_s=statistics.median(times), min_s=min(times), calls=len(times))

  with recorder.cpu_device_shim():
    for h, w in spec["eval_sizes"]:
      batch = [{"image": torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)).float(),
                "height": h, "width": w}]
      model.eval()

      def run_eval():
        with torch.no_grad():
          model(batch)
      results[f"eval {h}x{w} b1"] = timed(run_eval, spec["repeats"])
    if spec["train"]:
      from detectron2.structures import Boxes, Instances
      h, w = spec["train_size"]
      batch = []
      for _ in range(spec["train_batch"]):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.from_numpy(recorder._gt_boxes(rng, h, w, spec["boxes"])))
        inst.gt_classes = torch.from_numpy(rng.integers(0, 80, spec["boxes"])).long()
        batch.append({"image": torch.from_numpy(
            rng.integers(0, 256, (3, h, w), dtype=np.uint8)).float(), "instances": inst})
      model.train()
      model.dn_number = dn_number

      def run_train():
        model.zero_grad(set_to_none=True)
        loss = sum(model(batch).values())
        loss.backward()
      results[f"train {h}x{w} b{spec['train_batch']}"] = timed(run_train, spec["repeats"])
  import resource
  results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  print("RESULT " + json.dumps(results), flush=True)


# ----------------------------------------------------------------------------- driver side


def run_detrex(args, spec):
  env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(args.threads))
  proc = subprocess.run([args.detrex_python, os.path.abspath(__file__), "--detrex-worker",
                         json.dumps(spec)], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=args.timeout)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"detrex worker failed:\n{(proc.stderr or proc.stdout)[-3000:]}")


def run_ours(args):
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import benchmark
  out = {}
  for h, w in [_size(s) for s in args.eval_sizes.split(",") if s]:
    r = benchmark.run_task(dict(task="eval", config="r50", height=h, width=w, batch=1,
                                repeats=args.repeats), args.timeout)
    if "error" in r:
      raise RuntimeError(r["error"])
    out[f"eval {h}x{w} b1"] = dict(median_s=r["median_s"], min_s=r["min_s"],
                                   peak_rss_gib=r["memory"]["mib"] / 1024)
  if "train" in args.parts:
    h, w = _size(args.train_size)
    r = benchmark.run_task(dict(task="train", config="r50", height=h, width=w,
                                batch=args.train_batch, msda="auto", repeats=args.repeats,
                                model=json.loads(args.model_overrides)), args.timeout)
    if "error" in r:
      raise RuntimeError(r["error"])
    out[f"train {h}x{w} b{args.train_batch}"] = dict(
        median_s=r["median_s"], min_s=r["min_s"], peak_rss_gib=r["memory"]["mib"] / 1024)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--detrex-worker", help=argparse.SUPPRESS)
  parser.add_argument("--detrex-python", help="python of an environment with detrex installed")
  parser.add_argument("--detrex-root", default=os.environ.get("DETREX_ROOT"),
                      help="detrex source tree (holds projects/focus_detr); env DETREX_ROOT")
  parser.add_argument("--config", default=DEFAULT_CONFIG)
  parser.add_argument("--parts", default="eval,train")
  parser.add_argument("--eval-sizes", default="800x1333,512x768")
  parser.add_argument("--train-size", default="512x768")
  parser.add_argument("--train-batch", type=int, default=2)
  parser.add_argument("--boxes", type=int, default=8, help="ground-truth boxes per image")
  parser.add_argument("--model-overrides", default="{}",
                      help="JSON config.model overrides for ours, e.g. '{\"remat\": \"none\"}'")
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--timeout", type=int, default=1200)
  parser.add_argument("--json")
  args = parser.parse_args()
  if args.detrex_worker:
    detrex_worker(json.loads(args.detrex_worker))
    return
  if not args.detrex_python or not args.detrex_root:
    parser.error("--detrex-python and --detrex-root (or DETREX_ROOT) are required")
  if "eval" not in args.parts:
    args.eval_sizes = ""
  spec = dict(config=args.config, detrex_root=args.detrex_root, threads=args.threads,
              repeats=args.repeats, eval_sizes=[_size(s) for s in args.eval_sizes.split(",") if s],
              train="train" in args.parts, train_size=_size(args.train_size),
              train_batch=args.train_batch, boxes=args.boxes)
  started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
  t0 = time.perf_counter()
  detrex_a = run_detrex(args, spec)
  print("detrex (before):", json.dumps(detrex_a), flush=True)
  ours = run_ours(args)
  print("ours:", json.dumps(ours), flush=True)
  detrex_b = run_detrex(args, spec)
  print("detrex (after):", json.dumps(detrex_b), flush=True)
  rows = []
  print(f"\nstarted {started}, {time.perf_counter() - t0:.0f} s, {os.cpu_count()} CPUs, "
        f"{args.threads} threads each side")
  print("| measurement | detrex before s | ours s | detrex after s | min(detrex) / ours |")
  print("|---|---|---|---|---|")
  for name, mine in ours.items():
    a, b = detrex_a[name]["median_s"], detrex_b[name]["median_s"]
    ratio = min(a, b) / mine["median_s"]
    rows.append(dict(name=name, detrex_before_s=a, ours_s=mine["median_s"], detrex_after_s=b,
                     ratio=ratio))
    print(f"| {name} | {a:.2f} | {mine['median_s']:.2f} | {b:.2f} | {ratio:.2f}x |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(command=" ".join(sys.argv), started=started, detrex_before=detrex_a,
                     ours=ours, detrex_after=detrex_b, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
