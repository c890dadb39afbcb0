"""Input pipeline benchmark (`scripts/benchmark_input.py`, BENCHMARKS.md "Input pipeline"):
images/s of the training and evaluation streams against a decode-only baseline, canvas fill and
pixel work per image against detrex's (simulated), on the demo's synthetic set and a generated
COCO-like folder ("before": one canvas pair; "bucketed": the default recipe)."""

import json
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from configs import common, demo_synthetic
from focus_detr_jax import benchmarks
from focus_detr_jax.benchmarks import measure as bm
from focus_detr_jax.data import buckets, datasets, iterators, streams, testing, transforms

SECTION = "## Input pipeline"


def _timed(iterator, count_fn, seconds, min_items=3):
  """(items/s, items) after one untimed warm-up element, for `seconds` or until exhausted."""
  if next(iterator, None) is None:
    return float("nan"), 0
  n = items = 0
  start = time.perf_counter()
  for el in iterator:
    items += count_fn(el)
    n += 1
    if time.perf_counter() - start >= seconds and n >= min_items:
      break
  elapsed = time.perf_counter() - start
  return (items / elapsed if elapsed > 0 else float("nan")), items


def decode_only(data: datasets.DataConfig, seconds):
  """Baseline: TFDS records of the training split -> decoded uint8 images, same parallelism."""
  builder, _ = datasets.get_builder(data)
  ds = datasets.read(builder, data.train_split, shuffle_files=False, seed=0)
  ds = ds.repeat().map(datasets.graph_fn(
      lambda ex: tf.shape(transforms.decode_image(ex["image"]))),
                       num_parallel_calls=streams._npc(data))  # pylint: disable=protected-access
  ds = ds.batch(int(data.batch_size)).prefetch(2)
  return _timed(iter(ds), lambda b: int(b.shape[0]), seconds)


class _Geometry:
  """Accumulates canvas pixels, image pixels and images of the batches it counts."""

  def __init__(self):
    self.canvas = self.image = self.images = 0

  def count(self, b, valid):
    h, w = b["image"].shape[1:3]
    n = int(valid.sum())
    self.canvas += h * w * n
    self.image += int((b["image_size"][valid, 0] * b["image_size"][valid, 1]).sum())
    self.images += n
    return n

  @property
  def fill(self):
    return self.image / max(self.canvas, 1)

  @property
  def per_image(self):
    return self.canvas / max(self.images, 1)


def stream(data: datasets.DataConfig, seconds, train):
  """(images/s, images, `_Geometry`) of the training stream (uint8, as the training loop
  reads it) or of the evaluation stream."""
  geo = _Geometry()
  if train:
    it = iterators.make_train_iterator(data, process_index=0, process_count=1,
                                       normalize_on_host=False)
    return (*_timed(it, lambda b: geo.count(b, np.ones(b["image"].shape[0], bool)), seconds), geo)
  it = iterators.make_eval_iterator(data, process_index=0, process_count=1)
  return (*_timed(it, lambda b: geo.count(b, b["example_valid"]), seconds, min_items=1), geo)


def coco_like_folder(root, num_train, num_eval, seed=0):
  """A COCO-format folder of JPEGs with `buckets.COCO_LIKE_SIZE_MIX` sizes (written once):
  textured backgrounds and 3-8 coloured rectangles. Returns the (images, json) of train, eval."""
  def images(n, split_seed):
    rng = np.random.default_rng([seed, split_seed])
    sizes = buckets.size_mix_sample(n=n, seed=seed * 10 + split_seed)
    out = []
    for k, (h, w) in enumerate(sizes):
      img = (rng.random((h, w, 3)) * 60 + 90).astype(np.uint8)
      anns = []
      for _ in range(int(rng.integers(3, 9))):
        bw, bh = int(rng.integers(16, w // 3)), int(rng.integers(16, h // 3))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        img[y:y + bh, x:x + bw] = rng.integers(0, 256, 3)
        anns.append({"category_id": 1, "bbox": [x, y, bw, bh], "area": bw * bh})
      out.append({"file_name": f"{k:06d}.jpg", "data": testing.encode(img), "id": k + 1,
                  "height": int(h), "width": int(w), "annotations": anns})
    return out

  root = os.path.join(root, f"n{num_train}_{num_eval}_s{seed}")
  stamp = os.path.join(root, "complete")
  cats = [{"id": 1, "name": "box"}]
  if not os.path.exists(stamp):
    testing.write_coco_folder(root, "train", images(num_train, 1), cats)
    testing.write_coco_folder(root, "val", images(num_eval, 2), cats)
    Path(stamp).write_text("ok")
  ann = os.path.join(root, "annotations", "instances_{}.json")
  return ((os.path.join(root, "train"), ann.format("train")),
          (os.path.join(root, "val"), ann.format("val")))


def coco_like_config(args, root, before: bool):
  config = common.get_base_config()
  data = config.data                               # the COCO recipe (spec §9)
  (data.folder.train_images, data.folder.train_annotations), (
      data.folder.eval_images, data.folder.eval_annotations) = coco_like_folder(
          root, args.coco_images, args.coco_eval_images)
  data.folder.name = "coco_like"
  data.update(dataset="coco_folder", data_dir=os.path.join(root, "tfds"), batch_size=16,
              eval_batch_size=8)
  if before:                                       # the single canvas pair of before
    data.update(group_bounds=(1.0,), scale_buckets=None, canvases=((800, 1333), (1333, 800)),
                canvas_weights=(1.0, 1.0), eval_canvases=None)
  return config


def _annotated_sizes(path):
  """int [N, 2] (h, w) of the images of an instances JSON."""
  with open(path) as f:
    return np.asarray([(im["height"], im["width"]) for im in json.load(f)["images"]], np.int64)


def run(args):
  """The three settings' rows (`args`: the script's flags as attributes)."""
  run.load = os.getloadavg()
  rows = []
  demo = demo_synthetic.get_config()
  demo.data.synthetic.root = args.synthetic_root or demo.data.synthetic.root
  settings = [("demo (synthetic 256x256, configs/demo_synthetic.py)", demo, False)]
  coco_root = args.coco_root or os.path.join(tempfile.gettempdir(), "focus_detr_bench_coco_like")
  settings += [(name, coco_like_config(args, coco_root, before), True) for name, before in (
      ("COCO recipe, before: 800x1333 / 1333x800, 50/50", True),
      ("COCO recipe, bucketed (default)", False))]
  for name, config, coco in settings:
    data = datasets.DataConfig.from_config(config)
    t = time.perf_counter()
    datasets.get_builder(data)   # generate (once) and prepare (once); not timed
    print(f"[{name}] data ready in {time.perf_counter() - t:.1f} s", flush=True)
    base, _ = decode_only(data, args.seconds)
    train, n_train, tgeo = stream(data, args.seconds, train=True)
    evaluation, n_eval, egeo = stream(data, args.seconds, train=False)
    row = dict(name=name, batch=int(data.batch_size), base=base, train=train,
               n_train=n_train, eval=evaluation, n_eval=n_eval, tgeo=tgeo, egeo=egeo,
               shapes=len(streams.train_shapes(data)))
    if coco:
      d = config.data
      hw = _annotated_sizes(d.folder.train_annotations)
      row["detrex"], row["own"] = buckets.detrex_pixels_per_image(hw, d, epochs=8)
      row["sim"] = buckets.bucketed_canvas_stats(hw, d, streams.train_schedule(data), draws=8)
      row["eval_sim"] = buckets.eval_pixels_per_image(
          _annotated_sizes(d.folder.eval_annotations), d, d.eval_canvases or d.canvases)
    rows.append(row)
    print(f"[{name}] decode-only {base:.1f} img/s, train {train:.1f} img/s ({n_train} images, "
          f"fill {tgeo.fill:.2f}, {tgeo.per_image / 1e6:.3f} Mpx/image), eval "
          f"{evaluation:.1f} img/s ({n_eval} images, fill {egeo.fill:.2f})", flush=True)
  return rows


def table(rows) -> str:
  """Throughput table, then (COCO settings) the pixel-work table."""
  lines = benchmarks.table(
      ["setting", "batch", "training shapes", "decode-only", "training stream",
       "evaluation stream"],
      [[r["name"], str(r["batch"]), str(r["shapes"]), f"{r['base']:.1f} img/s",
        f"{r['train']:.1f} img/s ({r['n_train']} images)",
        f"{r['eval']:.1f} img/s ({r['n_eval']} images)"] for r in rows])
  coco = [r for r in rows if "detrex" in r]
  if coco:
    lines += [""] + benchmarks.table(
        ["COCO recipe", "train canvas fill (measured)", "canvas px per train image (measured)",
         "same, simulated (8 draws per image)", "detrex px per image (simulated)",
         "ours / detrex", "rescaled to fit (simulated: plain, crop branch)",
         "eval canvas px / detrex's (each image at its own size)"],
        [[r["name"], f"{r['tgeo'].fill:.2f}", f"{r['tgeo'].per_image / 1e6:.3f} M",
          f"{r['sim'].pixels_per_image / 1e6:.3f} M", f"{r['detrex'] / 1e6:.3f} M",
          f"**{r['sim'].pixels_per_image / r['detrex']:.2f}x** (measured "
          f"{r['tgeo'].per_image / r['detrex']:.2f}x)",
          f"{100 * r['sim'].rescaled_plain:.1f}%, {100 * r['sim'].rescaled_crop:.1f}%",
          f"{r['eval_sim'][0] / r['eval_sim'][1]:.2f}x (measured fill {r['egeo'].fill:.2f})"]
         for r in coco])
  return "\n".join(lines)


def section(rows, command, seconds) -> str:
  """The whole "## Input pipeline" section of BENCHMARKS.md."""
  date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
  load = ", ".join(f"{v:.1f}" for v in getattr(run, "load", os.getloadavg()))
  machine = f"{os.cpu_count()} CPUs (nproc), {bm.cpu_model(platform.processor() or 'unknown CPU')}"
  return f"""{SECTION}

Measured {date} on {machine}, TensorFlow {tf.__version__} (tf.data on the CPU).
**The machine was shared with other jobs during the measurement** (load average {load} at the
start), so the absolute images/s are pessimistic and noisy; the pixel counts are not.

Command:

```bash
{command}
```

{table(rows)}

- *decode-only*: the training split's records decoded to uint8, same `num_parallel_calls`.
- *training stream*: `make_train_iterator` as the training loop uses it (decode, flip,
  multi-scale resize or resize+crop+resize, boxes, padding into the step's canvas, batching;
  uint8 out, normalised on the device), steady state over ~{seconds:.0f} s. *evaluation
  stream*: `make_eval_iterator` (resize, pad into the smallest canvas that holds the image,
  batch, host normalisation).
- COCO-like folder: JPEGs with the sizes of `buckets.COCO_LIKE_SIZE_MIX` (our approximation of
  COCO's mix; COCO itself is not on this machine). *Measured* columns count the batches the
  stream produced in the timed window (few images: noisy); *simulated* columns apply the same
  size arithmetic (`buckets.augmented_sizes`, detectron2 rounding) to every image of the folder
  8 times. detrex: each image augmented on its own, orientation-paired batches of 2 padded to
  their own maximum (`ImageList`, no size divisibility).
- *rescaled to fit*: images larger than their step's canvas, scaled down (counted in
  `images_rescaled_to_fit`); the plain branch's are the widest images (16:9, panoramas).
"""


def choose():
  """Prints the canvases `buckets.choose_*` picks for the COCO recipe on the size mix."""
  data = common.get_data_config("coco")
  hw = buckets.size_mix_sample(n=2000)
  bounds = common.COCO_GROUP_BOUNDS
  sb, canvases = buckets.choose_train_canvases(hw, data, 2, 0.01, group_bounds=bounds)
  schedule = buckets.make_schedule(canvases, data.train_scales, sb, bounds,
                                   buckets.group_shares(hw, data, bounds), 0)
  test = buckets.size_mix_sample(n=4000, seed=1)
  detrex, _ = buckets.detrex_pixels_per_image(test, data)
  stats = buckets.bucketed_canvas_stats(test, data, schedule, seed=1)
  print(f"group_bounds={bounds}\nscale_buckets={sb}\ncanvases={canvases}\n"
        f"eval_canvases={buckets.choose_eval_canvases(hw, data)}\n"
        f"pixels per image {stats.pixels_per_image / detrex:.3f}x detrex; {stats}")


def write_section(text: str, path: Path):
  """Replaces (or appends) this section of BENCHMARKS.md, re-reading the file just before."""
  content = path.read_text() if path.exists() else "# Benchmarks\n"
  pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(content):
    content = pattern.sub(lambda _: text.rstrip() + "\n\n", content)
  else:
    content = content.rstrip() + "\n\n" + text.rstrip() + "\n"
  path.write_text(content.rstrip() + "\n")
