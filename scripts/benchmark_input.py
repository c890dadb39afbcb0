"""Input pipeline: throughput (images/s), canvas fill and pixel work per image vs detrex.

  python scripts/benchmark_input.py                 # prints the tables
  python scripts/benchmark_input.py --write         # also writes "## Input pipeline" into
                                                    # BENCHMARKS.md
  python scripts/benchmark_input.py --choose        # (re)chooses the COCO canvases on the size
                                                    # mix and prints them (no timing)

Settings:
  * demo: `configs/demo_synthetic.py` (the cached synthetic set, 256x256 JPEGs, 256x256 canvas,
    batch 8), exactly the input the demo trains on;
  * COCO recipe on a COCO-like folder: generated JPEGs whose sizes follow
    `buckets.COCO_LIKE_SIZE_MIX` (long side 640: 4:3, 3:2, 16:9, portrait, square, ...), read
    through the COCO-format folder builder with `get_data_config("coco")`, batch 16, twice:
    "before" (the old 800x1333 / 1333x800 canvas pair, 50/50 per step, scale per image) and
    "bucketed" (the default: 4 aspect groups x 2 scale buckets, the scale per step, the
    orientation of a step following the data).

For each: images/s of the training stream (`make_train_iterator`: decode, augment, pad, batch;
uint8, normalised on the device in training) and of the evaluation stream, the decode-only
baseline (same records, same parallelism, nothing else), and from the batches themselves:
canvas fill (image pixels / canvas pixels), canvas pixels per image, and the distinct shapes.
detrex's pixel work per image is simulated on the same folder's image sizes
(`buckets.detrex_pixels_per_image`: each image augmented on its own, orientation-paired
batches of 2 padded to their maximum); evaluation is compared with detrex's batch-1 evaluation
(each image at its own size). Iterator construction and the first batch are not timed.
"""

import shlex
import sys
from pathlib import Path

from focus_detr_jax import benchmarks, cli
from focus_detr_jax.benchmarks import input as bench_input

REPO = Path(__file__).resolve().parents[1]


def define_flags(fv, _argv):
  s, i, b, f, _ = benchmarks.flag_definers(fv)
  f("seconds", 10.0, "time per measurement")
  i("coco-images", 200, "COCO-like training images")
  i("coco-eval-images", 48, "COCO-like evaluation images")
  s("coco-root", "", "where the COCO-like folder is generated")
  s("synthetic-root", "", "synthetic cache (default: $FOCUS_DETR_DATA_DIR/synthetic or "
    "~/.cache/focus_detr_jax/synthetic)")
  b("write", False, "update BENCHMARKS.md")
  b("choose", False, "choose the COCO canvases on the size mix and print them")
  s("benchmarks-file", str(REPO / "BENCHMARKS.md"), "the file --write updates")


def main_with_flags(fv, positional):
  args = benchmarks.script_args(fv, positional)
  if args.choose:
    bench_input.choose()
    return
  rows = bench_input.run(args)
  print(bench_input.table(rows))
  if args.write:
    command = "python scripts/benchmark_input.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:])
    bench_input.write_section(bench_input.section(rows, command.strip(), args.seconds),
                              Path(args.benchmarks_file))
    print(f"wrote {bench_input.SECTION!r} to {args.benchmarks_file}")


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, define_flags, main_with_flags))
