"""Bad input never crashes and never passes silently: each case handled and counted."""

import io
import json
import math
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import data_helpers as helpers
from focus_detr_jax.data import coco_folder
from focus_detr_jax.data import iterators
from focus_detr_jax.data.datasets import DataConfig

CATS = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
HW = (48, 64)
GOOD_BOX = {"category_id": 1, "bbox": [4, 4, 20, 16]}


def _img(mode=None, fmt="JPEG", **kw):
  return helpers.encode(helpers.drawn_image(HW, [(4, 4, 24, 20)], background=200), fmt, mode,
                        **kw)


def _exif_rotated():
  """A JPEG stored 64 wide x 48 high whose EXIF says: rotate to 48 wide x 64 high."""
  im = Image.fromarray(helpers.drawn_image(HW, [(4, 4, 24, 20)], background=200))
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
  return buf.getvalue()


def _sixteen_bit():
  arr = (np.arange(HW[0] * HW[1]).reshape(HW) * 20).astype(np.uint16)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "PNG")
  return buf.getvalue()


def _entries():
  good = _img()
  noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3)).astype(np.uint8)
  full = helpers.encode(noise)
  truncated = full[:len(full) * 2 // 3]  # header intact, pixel data cut
  many = [{"category_id": 1 + (k % 2), "bbox": [2 + 4 * k, 2, 3, 3]} for k in range(12)]
  return [
      dict(id=1, file_name="good.jpg", data=good, annotations=[GOOD_BOX]),
      dict(id=2, file_name="gray.jpg", data=_img("L"), annotations=[GOOD_BOX]),
      dict(id=3, file_name="cmyk.jpg", data=_img("CMYK"), annotations=[GOOD_BOX]),
      dict(id=4, file_name="png_named.jpg", data=_img(fmt="PNG"), annotations=[GOOD_BOX]),
      dict(id=5, file_name="rgba.png", data=_img("RGBA", "PNG"), annotations=[GOOD_BOX]),
      dict(id=6, file_name="palette.png", data=_img("P", "PNG"), annotations=[GOOD_BOX]),
      dict(id=7, file_name="deep.png", data=_sixteen_bit(), annotations=[GOOD_BOX]),
      dict(id=8, file_name="truncated.jpg", data=truncated, annotations=[GOOD_BOX]),
      dict(id=9, file_name="corrupt.jpg", data=b"\xff\xd8\xff\xe0 not a jpeg" * 10,
           annotations=[GOOD_BOX]),
      dict(id=10, file_name="missing.jpg", data=None, annotations=[GOOD_BOX]),
      dict(id=11, file_name="boxes.jpg", data=good, annotations=[
          GOOD_BOX,
          {"category_id": 2, "bbox": [50, 30, 30, 30]},           # partly outside: clipped
          {"category_id": 1, "bbox": [70, 60, 5, 5]},             # entirely outside: dropped
          {"category_id": 1, "bbox": [10, 10, 0, 5]},             # zero area: dropped
          {"category_id": 1, "bbox": [math.nan, 1, 2, 2]},        # not finite: dropped
          {"category_id": 1, "bbox": [1, 2, 3]},                  # malformed: dropped
          {"category_id": 99, "bbox": [1, 1, 5, 5]},              # unknown category: dropped
      ]),
      dict(id=12, file_name="noann.jpg", data=good, annotations=[]),
      dict(id=13, file_name="many.jpg", data=good, annotations=many),
      dict(id=14, file_name="resized.jpg", data=good, height=96, width=128,
           annotations=[{"category_id": 1, "bbox": [8, 8, 40, 32]}]),
      dict(id=15, file_name="exif.jpg", data=_exif_rotated(), height=64, width=48,
           annotations=[{"category_id": 2, "bbox": [2, 2, 10, 10]}]),
      dict(id=16, file_name="crowd.jpg", data=good,
           annotations=[{**GOOD_BOX, "iscrowd": 1}]),
  ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("bad"))
  entries = _entries()
  images_dir, ann_path = helpers.write_coco_folder(root, "train", entries, CATS)
  data = json.load(open(ann_path))
  data["images"].append({"id": 1, "file_name": "dup.jpg"})           # duplicate id
  data["images"].append({"id": 99})                                  # no file_name
  data["annotations"].append({"id": 999, "image_id": 12345, "category_id": 1,
                              "bbox": [1, 1, 2, 2]})                 # unknown image
  json.dump(data, open(ann_path, "w"))
  splits = {"train": (images_dir, ann_path), "validation": (images_dir, ann_path)}
  builder = coco_folder.prepare(splits, data_dir=os.path.join(root, "tfds"))
  return root, splits, builder


def test_preparation_counts_every_case(prepared):
  _, _, builder = prepared
  s = builder.prepare_stats["train"]
  expect = {
      "images_listed": 18, "images_duplicate_id": 1, "images_invalid_entry": 1,
      "images_missing": 1, "images_corrupt": 2,
      "images_written": 13, "images_grayscale": 1, "images_converted_cmyk": 1,
      "images_png": 4, "images_converted_alpha": 1, "images_converted_palette": 1,
      "images_converted_high_bit_depth": 1, "images_exif_rotated": 1,
      "images_size_mismatch_rescaled": 1, "images_without_annotations": 1,
      "annotations_unknown_image": 1, "annotations_unknown_category": 1,
      "boxes_clipped": 1, "boxes_outside_dropped": 1, "boxes_zero_area_dropped": 1,
      "boxes_invalid_dropped": 2,
  }
  assert {k: s[k] for k in expect} == expect
  # Counts survive in the prepared dataset's metadata.
  again = coco_folder.CocoFolder(splits=prepared[1], data_dir=os.path.join(prepared[0], "tfds"))
  assert again.prepare_stats["train"]["images_written"] == 13


def test_prepared_images_decode_as_rgb_with_aligned_boxes(prepared):
  _, _, builder = prepared
  seen = {}
  for ex in builder.as_dataset("train").as_numpy_iterator():
    seen[int(ex["image/id"])] = ex
    assert ex["image"].ndim == 3 and ex["image"].shape[-1] == 3
  assert sorted(seen) == [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 15, 16]
  assert seen[15]["image"].shape[:2] == (64, 48)                      # EXIF applied
  np.testing.assert_allclose(seen[14]["objects"]["bbox"][0],            # rescaled from 96x128
                             [4 / 48, 4 / 64, 20 / 48, 24 / 64], atol=1e-6)
  np.testing.assert_allclose(seen[11]["objects"]["bbox"][1], [30 / 48, 50 / 64, 1.0, 1.0],
                             atol=1e-6)                                 # clipped
  assert len(seen[11]["objects"]["bbox"]) == 2
  assert seen[16]["objects"]["is_crowd"].tolist() == [True]
  for iid in (2, 3, 5, 6):  # converted images still show the rectangle where its box says
    img = seen[iid]["image"]
    inside = img[4:20, 4:24].astype(float).mean()
    outside = img[30:, 30:].astype(float).mean()
    assert abs(inside - outside) > 20, iid


def _config(root, splits, **kw):
  config = helpers.small_config(root, size=64, dataset="coco_folder", max_boxes=5, **kw)
  config.folder.train_images, config.folder.train_annotations = splits["train"]
  config.folder.eval_images, config.folder.eval_annotations = splits["validation"]
  config.data_dir = os.path.join(root, "tfds")
  config.batch_size = 2
  config.eval_batch_size = 4
  return config


def test_eval_counts_truncation_and_keeps_images_without_annotations(prepared):
  root, splits, _ = prepared
  it = iterators.make_eval_iterator(DataConfig.from_config(_config(root, splits)))
  batches = list(it)
  ids = np.concatenate([b["image_id"][b["example_valid"]] for b in batches])
  assert sorted(ids.tolist()) == [1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 15, 16]
  assert len(batches) == 4 and batches[-1]["example_valid"].tolist() == [True, False, False,
                                                                         False]
  many = [b for b in batches if 13 in b["image_id"]][0]
  row = list(many["image_id"]).index(13)
  assert many["box_valid"][row].sum() == 5 and many["boxes"].shape[1] == 5
  s = it.stats
  assert s["images_used"] == 13 and s["images_unreadable"] == 0
  assert s["images_truncated"] == 1 and s["boxes_truncated"] == 7
  assert s["boxes_crowd_dropped"] == 1


def test_training_skips_images_without_annotations_and_counts(prepared):
  root, splits, _ = prepared
  it = iterators.make_train_iterator(DataConfig.from_config(_config(root, splits, augment=False)))
  ids = []
  for _ in range(12):  # ~2 epochs of the 11 usable images
    b = next(it)
    ids.extend(b["image_id"].tolist())
    assert b["box_valid"].sum(axis=1).max() <= 5
    assert np.isfinite(b["image"]).all()
  assert 12 not in ids and 16 not in ids  # no annotation / crowd only
  assert set(ids) == {1, 2, 3, 4, 5, 6, 7, 11, 13, 14, 15}
  s = it.stats
  assert s["images_without_annotations"] >= 2 and s["images_truncated"] >= 1
  assert s["images_seen"] == s["images_used"] + s["images_without_annotations"] + s[
      "images_unreadable"]
  assert s["boxes_truncated"] == 7 * s["images_truncated"]


# ----------------------------------------------------------------------------- one test per case

def _examples(builder):
  return {int(ex["image/id"]): ex for ex in builder.as_dataset("train").as_numpy_iterator()}


@pytest.fixture(scope="module")
def prepared_examples(prepared):
  return _examples(prepared[2])


@pytest.mark.parametrize("iid,key", [(8, "images_corrupt"), (9, "images_corrupt"),
                                     (10, "images_missing")],
                         ids=["truncated", "corrupt", "missing"])
def test_unusable_image_files_skipped_and_counted(prepared, prepared_examples, iid, key):
  _, _, builder = prepared
  assert iid not in prepared_examples
  assert builder.prepare_stats["train"][key] >= 1


def test_grayscale_kept_as_is_and_counted(prepared, prepared_examples):
  _, splits, builder = prepared
  img = prepared_examples[2]["image"]
  assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
  assert builder.prepare_stats["train"]["images_grayscale"] == 1
  # Stored byte for byte: the prepared JPEG is the file on disk.
  raw = builder.as_dataset("train", decoders={"image": tfds.decode.SkipDecoding()}).filter(
      lambda ex: ex["image/id"] == 2)
  stored = next(iter(raw))["image"].numpy()
  assert stored == open(os.path.join(splits["train"][0], "gray.jpg"), "rb").read()


@pytest.mark.parametrize("iid,key", [(3, "images_converted_cmyk"), (5, "images_converted_alpha"),
                                     (6, "images_converted_palette"),
                                     (7, "images_converted_high_bit_depth")],
                         ids=["cmyk", "rgba", "palette", "16bit"])
def test_other_colour_modes_converted_to_rgb_and_counted(prepared, prepared_examples, iid, key):
  _, _, builder = prepared
  img = prepared_examples[iid]["image"]
  assert img.shape == (*HW, 3)
  assert builder.prepare_stats["train"][key] == 1
  if iid != 7:  # the rectangle is where its box says
    errors = helpers.alignment_errors(img, [[14 / 64, 12 / 48, 20 / 64, 16 / 48]], [0], [True],
                                      HW, colours=[tuple(int(v) for v in img[12, 14])])
    assert errors and max(errors) <= 1.0, errors


def test_png_data_kept_and_counted(prepared, prepared_examples):
  _, _, builder = prepared
  assert 4 in prepared_examples                   # PNG bytes in a .jpg file: used as PNG
  assert builder.prepare_stats["train"]["images_png"] == 4   # + rgba, palette, 16-bit
  np.testing.assert_array_equal(prepared_examples[4]["image"],
                                helpers.drawn_image(HW, [(4, 4, 24, 20)], background=200))


@pytest.mark.parametrize("case,key,n", [("zero_area", "boxes_zero_area_dropped", 1),
                                        ("outside", "boxes_outside_dropped", 1),
                                        ("partly_outside", "boxes_clipped", 1),
                                        ("not_finite_or_malformed", "boxes_invalid_dropped", 2),
                                        ("unknown_category", "annotations_unknown_category", 1)])
def test_bad_boxes_dropped_or_clipped_and_counted(prepared, prepared_examples, case, key, n):
  _, _, builder = prepared
  assert builder.prepare_stats["train"][key] == n, case
  bbox = prepared_examples[11]["objects"]["bbox"]
  assert len(bbox) == 2                           # the good box and the clipped one
  assert (bbox >= 0).all() and (bbox <= 1).all()
  assert ((bbox[:, 2] > bbox[:, 0]) & (bbox[:, 3] > bbox[:, 1])).all()


def test_image_without_annotations_kept_and_counted(prepared, prepared_examples):
  _, _, builder = prepared
  assert len(prepared_examples[12]["objects"]["bbox"]) == 0
  assert builder.prepare_stats["train"]["images_without_annotations"] == 1


def test_more_boxes_than_max_boxes_kept_at_preparation(prepared, prepared_examples):
  # Truncation to max_boxes happens in the pipeline (counted there, see the eval test above).
  assert len(prepared_examples[13]["objects"]["bbox"]) == 12


def test_counts_are_reported_in_the_logs(tmp_path, caplog):
  good = _img()
  images_dir, ann = helpers.write_coco_folder(str(tmp_path), "train", [
      dict(id=1, file_name="a.jpg", data=good, annotations=[GOOD_BOX]),
      dict(id=2, file_name="b.jpg", data=b"broken", annotations=[GOOD_BOX]),
      dict(id=3, file_name="c.jpg", data=good, annotations=[
          {"category_id": 1, "bbox": [10, 10, 0, 4]}]),
  ], CATS)
  with caplog.at_level("INFO"):
    builder = coco_folder.prepare({"train": (images_dir, ann)}, data_dir=str(tmp_path / "tfds"))
  text = caplog.text
  assert "skipping image" in text and "b.jpg" in text
  assert "images_corrupt=1" in text and "boxes_zero_area_dropped=1" in text
  assert "images_without_annotations=1" in text
  # ... and kept with the prepared dataset (metadata) for later runs.
  assert builder.info.metadata["prepare_stats"]["train"]["images_corrupt"] == 1


def test_pipeline_counts_are_logged(prepared, caplog):
  root, splits, _ = prepared
  it = iterators.make_eval_iterator(DataConfig.from_config(_config(root, splits)))
  for _ in it:
    pass
  with caplog.at_level("INFO"):
    iterators.log_stats(it, prefix="eval input")
  assert "eval input:" in caplog.text and "images_truncated=1" in caplog.text
  assert "boxes_truncated=7" in caplog.text and "images_png=" in caplog.text
