"""The embedded synthetic dataset: deterministic, cached, varied, read by the folder builder."""

import json
import os

import numpy as np
import pytest

from configs import demo_synthetic
import data_helpers as helpers
from focus_detr_jax.data import coco_folder
from focus_detr_jax.data import datasets
from focus_detr_jax.data import iterators
from focus_detr_jax.data import synthetic
from focus_detr_jax.data.datasets import DataConfig

SIZE = 96


def _render_many(difficulty, n=30, size=128):
  out = []
  for i in range(n):
    rng = np.random.default_rng([0, 0, i, synthetic.GENERATOR_VERSION])
    out.append(synthetic.render_image(rng, size, size, difficulty))
  return out


def _files(ds, split):
  images_dir, ann = ds.splits[split]
  data = json.load(open(ann))
  blobs = {im["id"]: open(os.path.join(images_dir, im["file_name"]), "rb").read()
           for im in data["images"]}
  return data, blobs


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  return root, synthetic.ensure_synthetic_dataset(root=root, num_train=6, num_val=3,
                                                  image_size=SIZE, seed=0)


def test_deterministic_and_independent_of_the_number_of_images(generated, tmp_path):
  _, ds = generated
  again = synthetic.ensure_synthetic_dataset(root=str(tmp_path), num_train=4, num_val=1,
                                             image_size=SIZE, seed=0)
  a, a_blobs = _files(ds, "train")
  b, b_blobs = _files(again, "train")
  assert b_blobs == {k: a_blobs[k] for k in b_blobs}            # same bytes, image by image
  first = {im["id"] for im in b["images"]}
  def strip(anns):  # annotation ids are running numbers over both splits
    return [{k: v for k, v in x.items() if k != "id"} for x in anns]
  assert strip([x for x in a["annotations"] if x["image_id"] in first]) == strip(b["annotations"])
  other = synthetic.ensure_synthetic_dataset(root=str(tmp_path), num_train=4, num_val=1,
                                             image_size=SIZE, seed=1)
  assert _files(other, "train")[1] != b_blobs                   # the seed matters


def test_generated_on_first_use_then_cached(generated, monkeypatch):
  root, ds = generated
  assert os.path.isfile(os.path.join(ds.root, "dataset.json"))
  assert not [d for d in os.listdir(root) if d.startswith(".tmp")]   # written atomically

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a cached dataset")

  monkeypatch.setattr(synthetic, "_write_split", fail)
  again = synthetic.ensure_synthetic_dataset(root=root, num_train=6, num_val=3, image_size=SIZE,
                                             seed=0)
  assert again == ds
  assert synthetic.default_root().endswith("synthetic")


def test_coco_format_files(generated):
  _, ds = generated
  data, blobs = _files(ds, "train")
  assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
  assert [c["name"] for c in data["categories"]] == list(synthetic.EASY_CLASSES)
  assert len(data["images"]) == len(blobs) == 6
  for ann in data["annotations"]:
    x, y, w, h = ann["bbox"]
    assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and w > 0 and h > 0
    assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0


def test_easy_variant_shapes_colours_sizes_overlaps_texture():
  images = _render_many("easy")
  per_class_centre = {}
  sides, overlaps, bg_std, bg_low = [], 0, [], []
  for img, anns in images:
    assert 1 <= len(anns) <= 4
    mask = np.zeros(img.shape[:2], bool)
    for cls, x0, y0, x1, y1, _ in anns:
      mask[y0:y1, x0:x1] = True
      per_class_centre.setdefault(cls, []).append(img[(y0 + y1) // 2, (x0 + x1) // 2])
      sides.append(max(x1 - x0, y1 - y0) / 128)
    overlaps += _overlapping_pairs(anns)
    gray = img.astype(np.float64).mean(-1)
    bg_std.append(gray[~mask].std())
    bg_low.append(_low_frequency_std(gray, mask))
  assert sorted(per_class_centre) == [0, 1, 2, 3]
  medians = {c: np.median(np.stack(v), axis=0) for c, v in per_class_centre.items()}
  for c, m in medians.items():   # each class has its own colour (jittered)
    assert np.abs(m - synthetic.EASY_COLOURS[c]).sum() < 60, (c, m)
  assert 0.12 <= min(sides) and max(sides) <= 0.75          # medium to large
  assert overlaps > 0                                      # mild overlap
  assert min(bg_std) > 3 and np.nanmin(bg_low) > 1.5       # textured, not flat


def test_hard_variant_many_classes_tiny_to_large_clutter():
  images = _render_many("hard")
  classes, sides, counts, overlaps, bg_std = set(), [], [], 0, []
  for img, anns in images:
    counts.append(len(anns))
    mask = np.zeros(img.shape[:2], bool)
    for cls, x0, y0, x1, y1, area in anns:
      classes.add(cls)
      sides.append(max(x1 - x0, y1 - y0) / 128)
      mask[y0:y1, x0:x1] = True
      assert 0 < area <= (x1 - x0) * (y1 - y0)
    overlaps += _overlapping_pairs(anns)
    bg_std.append(img.astype(np.float64).mean(-1)[~mask].std())
  assert classes == set(range(len(synthetic.HARD_CLASSES)))
  assert min(sides) < 0.06 and max(sides) > 0.45           # tiny to large
  assert max(counts) >= 10 and overlaps > len(images)      # crowded, occluded
  assert np.median(bg_std) > 8                             # strong texture and clutter


def _overlapping_pairs(anns):
  n = 0
  for j, a in enumerate(anns):
    for b in anns[j + 1:]:
      if min(a[3], b[3]) > max(a[1], b[1]) and min(a[4], b[4]) > max(a[2], b[2]):
        n += 1
  return n


def _low_frequency_std(gray, mask, cell=8):
  h, w = gray.shape
  blocks = gray.reshape(h // cell, cell, w // cell, cell).mean((1, 3))
  free = ~mask.reshape(h // cell, cell, w // cell, cell).any((1, 3))
  return blocks[free].std() if free.sum() > 3 else np.nan


def test_read_through_the_folder_builder(generated):
  root, ds = generated
  config = helpers.small_config(root, size=SIZE)
  config.synthetic.num_train, config.synthetic.num_val = 6, 3
  config.synthetic.root = root
  builder, meta = datasets.get_builder(DataConfig.from_config(config))
  assert isinstance(builder, coco_folder.CocoFolder)
  assert meta.category_names == synthetic.EASY_CLASSES and meta.category_ids == (1, 2, 3, 4)
  stats = builder.prepare_stats["train"]
  assert stats["images_written"] == 6 and stats["boxes_written"] > 6
  assert not any(v for k, v in stats.items() if k.endswith(("_dropped", "_corrupt", "_missing",
                                                            "_clipped")))
  data, _ = _files(ds, "validation")
  want = {im["id"]: sum(a["image_id"] == im["id"] for a in data["annotations"])
          for im in data["images"]}
  it = iterators.make_eval_iterator(DataConfig.from_config(config))
  got = {}
  for b in it:
    for i in np.nonzero(b["example_valid"])[0]:
      got[int(b["image_id"][i])] = int(b["box_valid"][i].sum())
      assert b["labels"][i][b["box_valid"][i]].max() < 4
  assert got == want
  assert it.stats["images_used"] == 3 and it.stats["images_unreadable"] == 0


def test_demo_config_uses_the_synthetic_preset():
  config = demo_synthetic.get_config()
  assert config.data.dataset == "synthetic" and config.data.synthetic.difficulty == "easy"
  assert tuple(config.data.canvases) == ((256, 256),)
  assert config.model.num_classes == len(synthetic.class_names("easy"))
