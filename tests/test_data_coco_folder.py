"""The TFDS builder for local COCO-format folders: features, category ids, boxes, reuse."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_helpers as helpers
from focus_detr_jax.data import coco_folder
from focus_detr_jax.data import datasets
from focus_detr_jax.data import iterators
from focus_detr_jax.data.datasets import DataConfig

CATEGORIES = [{"id": 11, "name": "ball"}, {"id": 3, "name": "box"}, {"id": 7, "name": "cone"}]


def _images(n, hw=(60, 80), seed=0):
  """n drawn images; image k has one rectangle per label in a random place."""
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n):
    rects, anns = [], []
    for label, cat in enumerate(sorted(c["id"] for c in CATEGORIES)):
      slot = hw[1] // len(CATEGORIES)  # one vertical band per label: no overlaps
      w, h = rng.integers(8, slot - 1), rng.integers(8, 25)
      x, y = label * slot + rng.integers(0, slot - w), rng.integers(0, hw[0] - h)
      rects.append((x, y, x + w, y + h))
      anns.append({"category_id": cat, "bbox": [int(x), int(y), int(w), int(h)],
                   "area": int(w * h)})
    img = helpers.drawn_image(hw, rects)
    out.append({"file_name": f"{k:04d}.png", "data": helpers.encode(img, "PNG"), "id": 100 + k,
                "height": hw[0], "width": hw[1], "annotations": anns, "rects": rects})
  return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("cocofolder"))
  train = _images(6)
  val = _images(3, seed=1)
  splits = {"train": helpers.write_coco_folder(root, "train", train, CATEGORIES),
            "validation": helpers.write_coco_folder(root, "val", val, CATEGORIES)}
  return root, splits, train, val


def test_features_match_tfds_coco_2017(folder):
  root, splits, _, _ = folder
  builder = coco_folder.prepare(splits, data_dir=os.path.join(root, "tfds"))
  ours = builder.info.features
  coco = tfds.builder("coco/2017").info.features  # the real builder's spec (no data needed)
  assert set(ours.keys()) == set(coco.keys())
  assert set(ours["objects"].feature.keys()) == set(coco["objects"].feature.keys())
  assert ours.get_tensor_info().keys() == coco.get_tensor_info().keys()
  for key in ("image", "image/filename", "image/id"):
    assert ours[key].get_tensor_info() == coco[key].get_tensor_info()
  for key in ("id", "area", "bbox", "is_crowd", "label"):
    a = ours["objects"].feature[key].get_tensor_info()
    b = coco["objects"].feature[key].get_tensor_info()
    assert (a.shape, a.dtype) == (b.shape, b.dtype), key


def test_category_ids_map_to_contiguous_labels_and_back(folder):
  root, splits, train, _ = folder
  builder = coco_folder.prepare(splits, data_dir=os.path.join(root, "tfds"))
  assert builder.category_ids == [3, 7, 11]
  assert builder.category_names == ["box", "cone", "ball"]
  assert builder.info.metadata["category_ids"] == [3, 7, 11]
  assert builder.info.features["objects"]["label"].names == ["box", "cone", "ball"]
  by_id = {im["id"]: im for im in train}
  n = 0
  for ex in builder.as_dataset("train").as_numpy_iterator():
    im = by_id[int(ex["image/id"])]
    assert ex["image"].shape == (60, 80, 3)
    for ann, bbox, label in zip(im["annotations"], ex["objects"]["bbox"],
                                ex["objects"]["label"]):
      assert builder.category_ids[label] == ann["category_id"]
      x, y, w, h = ann["bbox"]
      np.testing.assert_allclose(bbox, [y / 60, x / 80, (y + h) / 60, (x + w) / 80], atol=1e-6)
    n += 1
  assert n == len(train)


def test_prepared_once_then_reused_without_the_json(folder, monkeypatch):
  root, splits, _, _ = folder
  data_dir = os.path.join(root, "tfds")
  coco_folder.prepare(splits, data_dir=data_dir)
  calls = []
  monkeypatch.setattr(coco_folder, "read_categories", lambda *a: calls.append(a))
  builder = coco_folder.CocoFolder(splits=splits, data_dir=data_dir)
  assert builder.category_ids == [3, 7, 11] and not calls
  assert builder.prepare_stats["train"]["images_written"] == 6


def test_changed_annotations_give_a_new_dataset(folder, tmp_path):
  root, splits, _, _ = folder
  ann = json.load(open(splits["train"][1]))
  new_ann = tmp_path / "instances.json"
  ann["annotations"] = ann["annotations"][:1]
  new_ann.write_text(json.dumps(ann))
  a = coco_folder.CocoFolder(splits=splits, data_dir=str(tmp_path))
  b = coco_folder.CocoFolder(splits={"train": (splits["train"][0], str(new_ann))},
                             data_dir=str(tmp_path))
  assert a.builder_config.name != b.builder_config.name


def test_pipeline_on_a_folder_and_ground_truth(folder):
  root, splits, _, val = folder
  config = helpers.small_config(root, size=96, dataset="coco_folder")
  config.folder.train_images, config.folder.train_annotations = splits["train"]
  config.folder.eval_images, config.folder.eval_annotations = splits["validation"]
  config.data_dir = os.path.join(root, "tfds")
  np.testing.assert_array_equal(datasets.label_to_category_id(DataConfig.from_config(config)),
                                [3, 7, 11])
  batches = list(iterators.make_eval_iterator(DataConfig.from_config(config)))
  ids = np.concatenate([b["image_id"][b["example_valid"]] for b in batches])
  assert sorted(ids.tolist()) == [100, 101, 102]
  by_id = {im["id"]: im for im in val}
  for b in batches:
    for i in np.nonzero(b["example_valid"])[0]:
      img = helpers.denormalize(b["image"][i], config)
      errors = helpers.alignment_errors(img, b["boxes"][i], b["labels"][i], b["box_valid"][i],
                                        b["image_size"][i])
      assert max(errors) <= 1.6, errors
      assert tuple(b["orig_size"][i]) == (60, 80)
      assert b["box_valid"][i].sum() == len(by_id[int(b["image_id"][i])]["annotations"])
  gt = datasets.coco_ground_truth(DataConfig.from_config(config))
  assert sorted(im["id"] for im in gt["images"]) == [100, 101, 102]
  assert [c["id"] for c in gt["categories"]] == [3, 7, 11]
  want = {(a["image_id"] if "image_id" in a else im["id"], a["category_id"], tuple(a["bbox"]))
          for im in val for a in [{**x, "image_id": im["id"]} for x in im["annotations"]]}
  got = {(a["image_id"], a["category_id"], tuple(round(v, 3) for v in a["bbox"]))
         for a in gt["annotations"]}
  assert got == want


def test_a_dataset_prepared_by_another_process_meanwhile_is_read(folder, tmp_path, monkeypatch):
  """Two processes (the hosts of one run on a shared filesystem) prepare the same folder at once:
  TFDS's rename of its finished temporary directory fails for the second. It reads the first's."""
  _, splits, train, _ = folder
  config = helpers.small_config(str(tmp_path), size=96, dataset="coco_folder")
  config.folder.train_images, config.folder.train_annotations = splits["train"]
  config.folder.eval_images, config.folder.eval_annotations = splits["validation"]
  config.data_dir = str(tmp_path / "tfds")   # not prepared yet
  data = DataConfig.from_config(config)
  generate = coco_folder.CocoFolder._download_and_prepare
  raced = []

  def other_process_finishes_first(self, *args, **kwargs):
    if not raced:
      raced.append(1)
      datasets.get_builder(data)   # the other process: prepares and renames into place
    return generate(self, *args, **kwargs)

  monkeypatch.setattr(coco_folder.CocoFolder, "_download_and_prepare",
                      other_process_finishes_first)
  builder, meta = datasets.get_builder(data)
  assert raced and meta.category_ids == (3, 7, 11)
  ids = [int(ex["image/id"]) for ex in builder.as_dataset("train").as_numpy_iterator()]
  assert sorted(ids) == [im["id"] for im in train]
