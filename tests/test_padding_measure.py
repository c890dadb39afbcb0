"""The padding and compile measurements of scripts/measure_padding.py and
scripts/benchmark_compile.py (BENCHMARKS.md): their comparisons, their inputs, their plumbing."""

import json

import jax
import numpy as np
import pytest

from focus_detr_jax.benchmarks import compile as bench_compile
from focus_detr_jax.benchmarks import padding
from focus_detr_jax.data.datasets import DataConfig


def _dets(n=100, seed=0):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 100, size=(n, 2))
  return dict(scores=rng.uniform(0, 1, n).astype(np.float32),
              labels=rng.integers(0, 4, n), boxes=np.concatenate([xy, xy + 20], 1))


def test_compare_detections_same_shifted_rescored():
  exact = _dets()
  assert padding.compare_detections(exact, exact) == (0.0, 1.0)
  moved = {**exact, "boxes": exact["boxes"] + 50.0}                 # IoU 0 with every box
  assert padding.compare_detections(exact, moved) == (0.0, 0.0)
  relabelled = {**exact, "labels": exact["labels"] + 1}
  assert padding.compare_detections(exact, relabelled)[1] == 0.0
  rescored = {**exact, "scores": exact["scores"] * 0.5}
  change, recovered = padding.compare_detections(exact, rescored)
  assert change == pytest.approx(0.5 * exact["scores"].max()) and recovered == 1.0


def test_eval_canvas_is_the_smallest_that_holds_the_image():
  assert padding.eval_canvas(800, 1067) == (800, 1067)
  assert padding.eval_canvas(800, 1100) == (800, 1199)
  assert padding.eval_canvas(1100, 800) == (1199, 800)
  assert padding.eval_canvas(2000, 2000) == padding.OLD_COCO_CANVAS   # nothing holds it


def test_mixed_validation_folder_is_deterministic(tmp_path):
  sizes = ((48, 64), (64, 40))
  _, ann_a = padding.mixed_validation_folder(tmp_path / "a", sizes, per_size=2)
  _, ann_b = padding.mixed_validation_folder(tmp_path / "b", sizes, per_size=2)
  a, b = json.loads(open(ann_a).read()), json.loads(open(ann_b).read())
  assert a == b
  assert [(im["height"], im["width"]) for im in a["images"]] == [(48, 64)] * 2 + [(64, 40)] * 2
  assert a["annotations"] and {c["id"] for c in a["categories"]} == {1, 2, 3, 4}


def test_compile_benchmark_feeds_the_loop_its_training_batch(tiny_config):
  """The abstract batch has the keys, dtypes and shapes of a real training batch, and the
  benchmark's program (the loop's train step) lowers with it."""
  from focus_detr_jax.data import iterators
  config = tiny_config.copy_and_resolve_references()
  it = iterators.make_train_iterator(DataConfig.from_config(config), normalize_on_host=False)
  real = next(it)
  h, w = real["image"].shape[1:3]
  shapes = bench_compile.abstract_batch(config.data.batch_size, h, w, config.data.max_boxes)
  assert sorted(shapes) == sorted(real)
  for key, value in real.items():
    assert shapes[key].shape == value.shape, key
    assert shapes[key].dtype == jax.dtypes.canonicalize_dtype(value.dtype), key
  step, state = bench_compile.train_program(config)   # the loop's step, traced from shapes
  new_state = step.lower(state, shapes).out_info[0]
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
