"""Input pipeline throughput (images/s): training and evaluation streams vs. decode-only.

  python scripts/benchmark_input.py                 # prints the table
  python scripts/benchmark_input.py --write         # also writes "## Input pipeline" into
                                                    # BENCHMARKS.md

Two settings:
  * demo: `configs/demo_synthetic.py` (the cached synthetic set, 256x256 JPEGs, 256x256 canvas,
    batch 8), exactly the input the demo trains on;
  * COCO-like: a folder of generated 640x480 JPEGs (the "hard" synthetic variant: 3-15
    objects, textured backgrounds) read through the COCO-format folder builder with the COCO
    recipe of `get_data_config("coco")`: random flip, multi-scale resize 480..800 (max 1333),
    50% resize+crop, eval resize 800 (max 1333), 800x1333 canvas, batch 16.

For each setting, in the same run: the training stream (`make_train_iterator`: decode,
augment, pad, batch, host-side normalisation to float32), the evaluation stream
(`make_eval_iterator`) and the baseline, decoding the same records with the same parallelism
and nothing else. Iterator construction (graph tracing) and the first batch are not timed.
"""

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from focus_detr_jax.data import pipeline  # noqa: E402
from focus_detr_jax.data import transforms  # noqa: E402

SECTION = "## Input pipeline"


def _timed(iterator, count_fn, seconds, min_items=3):
  """(items/s, items) after one untimed warm-up element, for `seconds` or until exhausted."""
  try:
    next(iterator)
  except StopIteration:
    return float("nan"), 0
  n = 0
  items = 0
  start = time.perf_counter()
  for el in iterator:
    items += count_fn(el)
    n += 1
    if time.perf_counter() - start >= seconds and n >= min_items:
      break
  elapsed = time.perf_counter() - start
  return (items / elapsed if elapsed > 0 else float("nan")), items


def decode_only(config, seconds):
  """Baseline: TFDS records of the training split -> decoded uint8 images, same parallelism."""
  data = config.data
  builder, _ = pipeline.get_builder(config)
  ds = pipeline._read(builder, data.train_split, shuffle_files=False, seed=0)  # pylint: disable=protected-access
  ds = ds.repeat().map(tf.autograph.experimental.do_not_convert(
      lambda ex: tf.shape(transforms.decode_image(ex["image"]))),
                       num_parallel_calls=pipeline._npc(data))  # pylint: disable=protected-access
  ds = ds.batch(int(data.batch_size)).prefetch(2)
  return _timed(iter(ds), lambda b: int(b.shape[0]), seconds)


def train_stream(config, seconds):
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  return _timed(it, lambda b: int(b["image"].shape[0]), seconds)


def eval_stream(config, seconds):
  it = pipeline.make_eval_iterator(config, process_index=0, process_count=1)
  return _timed(it, lambda b: int(b["example_valid"].sum()), seconds, min_items=1)


def demo_config(args):
  from configs import demo_synthetic  # pylint: disable=import-outside-toplevel
  config = demo_synthetic.get_config()
  if args.synthetic_root:
    config.data.synthetic.root = args.synthetic_root
  return config


def coco_like_config(args, root):
  from configs import common  # pylint: disable=import-outside-toplevel
  config = common.get_base_config()
  data = config.data                               # the COCO recipe (spec §9)
  data.dataset = "synthetic"                       # read through the COCO folder builder
  data.synthetic.difficulty = "hard"
  data.synthetic.image_size = 480                  # 480 x 640 (H x W)
  data.synthetic.image_width = 640
  data.synthetic.num_train = args.coco_images
  data.synthetic.num_val = args.coco_eval_images
  data.synthetic.root = root
  data.canvases = ((800, 1333),)                   # every generated image is landscape
  data.batch_size = 16
  data.eval_batch_size = 8
  return config


def machine() -> str:
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"model name\s*:\s*(.+)", f.read())
    cpu = m.group(1).strip() if m else cpu
  except OSError:
    pass
  return f"{os.cpu_count()} CPUs (nproc), {cpu}"


def run(args):
  run.load = os.getloadavg()
  rows = []
  settings = [("demo (synthetic 256x256, configs/demo_synthetic.py)", demo_config(args))]
  coco_root = args.coco_root or os.path.join(tempfile.gettempdir(), "focus_detr_bench_input")
  settings.append(("COCO-like (640x480 JPEG folder, COCO recipe)",
                   coco_like_config(args, coco_root)))
  for name, config in settings:
    t = time.perf_counter()
    pipeline.get_builder(config)   # generate (once) and prepare (once); not timed
    print(f"[{name}] data ready in {time.perf_counter() - t:.1f} s", flush=True)
    base, _ = decode_only(config, args.seconds)
    train, n_train = train_stream(config, args.seconds)
    evaluation, n_eval = eval_stream(config, args.seconds)
    d = config.data
    canvas = "x".join(str(v) for v in d.canvases[0])
    rows.append((name, canvas, int(d.batch_size), base, train, n_train, evaluation, n_eval))
    print(f"[{name}] decode-only {base:.1f} img/s, train {train:.1f} img/s ({n_train} images), "
          f"eval {evaluation:.1f} img/s ({n_eval} images)", flush=True)
  return rows


def table(rows) -> str:
  lines = ["| setting | canvas | batch | decode-only (baseline) | training stream | "
           "evaluation stream |",
           "|---|---|---|---|---|---|"]
  for name, canvas, batch, base, train, n_train, ev, n_eval in rows:
    lines.append(f"| {name} | {canvas} | {batch} | {base:.1f} img/s | {train:.1f} img/s "
                 f"({train / base:.2f}x baseline, {n_train} images) | {ev:.1f} img/s "
                 f"({ev / base:.2f}x baseline, {n_eval} images) |")
  return "\n".join(lines)


def section(rows, command, seconds) -> str:
  date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
  load = ", ".join(f"{v:.1f}" for v in getattr(run, "load", os.getloadavg()))
  return f"""{SECTION}

Measured {date} on {machine()}, TensorFlow {tf.__version__} (tf.data on the CPU).
**The machine was shared with other jobs during the measurement** (other agents' test suites
and builds on the same cores; load average {load} at the start), so the absolute numbers are
pessimistic and noisy; the ratios to the same-run baseline are the more stable figure.

Command:

```bash
{command}
```

{table(rows)}

- *decode-only*: the training split's TFDS records decoded to uint8 (libjpeg, accurate IDCT),
  same `num_parallel_calls`, nothing else: what reading and decoding alone cost.
- *training stream*: `make_train_iterator` (decode, flip, multi-scale resize or resize+crop
  +resize, boxes, padding into the canvas, `max_boxes` targets, batching, host-side
  normalisation to float32 and padding mask), steady state over ~{seconds:.0f} s.
- *evaluation stream*: `make_eval_iterator` over the validation split (resize, pad, batch,
  normalise), first batch not timed.
- COCO-like: generated 640x480 JPEGs (the "hard" synthetic variant, 3-15 objects) through the
  COCO-format folder builder with the COCO recipe (`get_data_config("coco")`); one landscape
  canvas 800x1333. Per training image: decoding (~2 ms) is small next to the resizes to
  ~800x1067 (one, or three with the crop branch) and the padding into the canvas (tf.data side),
  and the float32 normalisation of the image region on the host (~8 ms per image; the batch is
  16 x 800 x 1333 x 3 float32 = 205 MB). tf.data uses every core it is given: detrex feeds 2
  images per GPU step, so a training host needs roughly (GPUs x 2 / step time) images/s.
"""


def write_section(text: str, path: Path):
  """Replaces (or appends) this section of BENCHMARKS.md, re-reading the file just before."""
  content = path.read_text() if path.exists() else "# Benchmarks\n"
  pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(content):
    content = pattern.sub(lambda _: text.rstrip() + "\n\n", content)
  else:
    content = content.rstrip() + "\n\n" + text.rstrip() + "\n"
  path.write_text(content.rstrip() + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
  parser.add_argument("--coco-images", type=int, default=64, help="COCO-like training images")
  parser.add_argument("--coco-eval-images", type=int, default=48)
  parser.add_argument("--coco-root", default="", help="where the COCO-like folder is generated")
  parser.add_argument("--synthetic-root", default="", help="synthetic cache (default: "
                      "$FOCUS_DETR_DATA_DIR/synthetic or ~/.cache/focus_detr_jax/synthetic)")
  parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
  parser.add_argument("--benchmarks-file", default=str(REPO / "BENCHMARKS.md"))
  args = parser.parse_args()
  rows = run(args)
  print(table(rows))
  if args.write:
    command = "python scripts/benchmark_input.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    write_section(section(rows, command.strip(), args.seconds), Path(args.benchmarks_file))
    print(f"wrote {SECTION!r} to {args.benchmarks_file}")


if __name__ == "__main__":
  main()
