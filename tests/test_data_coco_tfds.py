"""TFDS coco/2017 through `tfds.testing.mock_data`, against the real builder's feature spec.

COCO cannot be downloaded here. The mock replaces only the builder's file reading: the examples
below are encoded and serialised with the real `coco/2017` builder's `info.features` and
deserialised with the decoders the pipeline asks for, so the pipeline sees exactly the dtypes,
shapes and bbox convention (normalised [ymin, xmin, ymax, xmax], labels 0..79) of the prepared
dataset. Bad records a prepared coco/2017 can hold (the builder stores image bytes unchecked) are
handled by the pipeline itself: one example per case, each counted in `iterator.stats`.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import data_helpers as helpers
from focus_detr_jax.data import coco_folder
from focus_detr_jax.data import coco_tfds
from focus_detr_jax.data import datasets
from focus_detr_jax.data import iterators
from focus_detr_jax.data.datasets import DataConfig

HW = (60, 80)
RECTS = [(4, 6, 30, 26), (44, 8, 76, 30), (10, 34, 40, 56)]


def _drawn(hw=HW, rects=RECTS, fmt="JPEG", mode=None):
  return helpers.encode(helpers.drawn_image(hw, rects, background=0), fmt, mode)


def _objects(rects, labels, hw=HW, crowd=None):
  h, w = hw
  return [{"id": 100 + k, "area": int((x1 - x0) * (y1 - y0)),
           "bbox": tfds.features.BBox(ymin=y0 / h, xmin=x0 / w, ymax=y1 / h, xmax=x1 / w),
           "label": int(lab), "is_crowd": bool(crowd[k]) if crowd is not None else False}
          for k, ((x0, y0, x1, y1), lab) in enumerate(zip(rects, labels))]


def _noise_jpeg():
  noise = np.random.default_rng(0).integers(0, 255, (120, 160, 3)).astype(np.uint8)
  return helpers.encode(noise)


# image id -> (encoded image, objects). Labels 0..2 are drawn in helpers.COLOURS[label].
GOOD = {i: (_drawn(), _objects(RECTS, [0, 1, 2])) for i in (1, 2, 3, 4)}
PORTRAIT = {5: (_drawn((80, 60), [(4, 4, 30, 40)]), _objects([(4, 4, 30, 40)], [0], (80, 60)))}
# Labels far from 0: map back to COCO ids 1, 13 (label 11), 90 (label 79).
LABELS = {6: (_drawn(), _objects(RECTS, [0, 11, 79]))}
BAD = {
    20: ("truncated", _noise_jpeg()[:1500], _objects(RECTS[:1], [0])),
    21: ("corrupt", b"\xff\xd8\xff\xe0 this is not a jpeg" * 8, _objects(RECTS[:1], [0])),
    22: ("grayscale", _drawn(mode="L"), _objects(RECTS, [0, 1, 2])),
    23: ("cmyk", _drawn(mode="CMYK"), _objects(RECTS, [0, 1, 2])),
    24: ("png", _drawn(fmt="PNG"), _objects(RECTS, [0, 1, 2])),
    25: ("zero_area", _drawn(), _objects(RECTS + [(20, 20, 20, 40), (5, 50, 30, 50)],
                                         [0, 1, 2, 0, 1])),
    26: ("no_annotations", _drawn(), []),
    27: ("many_boxes", _drawn(), _objects([(2 + 6 * k, 2, 6 + 6 * k, 6) for k in range(12)],
                                          [k % 3 for k in range(12)])),
    28: ("crowd_only", _drawn(), _objects(RECTS[:1], [0], crowd=[True])),
}
MAX_BOXES = 8


def _records(with_bad: bool):
  out = {**GOOD, **PORTRAIT, **LABELS}
  if with_bad:
    out.update({i: (img, objs) for i, (_, img, objs) in BAD.items()})
  return out


def _mock(with_bad: bool):
  """`mock_data` whose records are serialised with the real builder's features."""
  records = _records(with_bad)

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
    del split, read_config, shuffle_files
    features = self.info.features
    serialized = [features.serialize_example({
        "image": img, "image/filename": f"{iid:012d}.jpg", "image/id": iid,
        "objects": objs}) for iid, (img, objs) in sorted(records.items())]
    ds = tf.data.Dataset.from_tensor_slices(serialized)
    return ds.map(lambda x: features.deserialize_example(x, decoders=decoders))

  return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                                as_dataset_fn=as_dataset)


def _config(tmp_path):
  c = helpers.small_config(str(tmp_path), size=96, dataset="coco", max_boxes=MAX_BOXES)
  c.canvases = ((96, 96),)
  c.train_scales = (60, 72)
  c.train_max_size = 96
  c.crop_resize_scales = (48, 60)
  c.crop_size_range = (40, 56)
  c.eval_scale = 60
  c.eval_max_size = 96
  c.batch_size = 2
  c.eval_batch_size = 4
  return c


def test_the_real_coco_2017_builder_and_its_spec():
  builder = coco_tfds.coco_builder()
  assert type(builder).__module__.startswith("tensorflow_datasets.")
  assert builder.name == "coco" and builder.builder_config.name == "2017"
  f = builder.info.features
  assert set(f.keys()) == {"image", "image/filename", "image/id", "objects"}
  assert set(f["objects"].feature.keys()) == {"id", "area", "bbox", "label", "is_crowd"}
  assert f["objects"]["label"].num_classes == len(coco_tfds.COCO_CATEGORY_IDS) == 80
  assert isinstance(f["objects"]["bbox"], tfds.features.BBoxFeature)


def test_eval_reads_every_image_once_with_aligned_boxes(tmp_path):
  config = _config(tmp_path)
  with _mock(with_bad=False):
    it = iterators.make_eval_iterator(DataConfig.from_config(config))
    batches = list(it)
  ids = np.concatenate([b["image_id"][b["example_valid"]] for b in batches])
  assert sorted(ids.tolist()) == sorted(_records(False))
  for b in batches:
    assert b["image"].shape[1:] == (96, 96, 3) and b["boxes"].shape[1:] == (MAX_BOXES, 4)
    for i in np.nonzero(b["example_valid"])[0]:
      iid = int(b["image_id"][i])
      _, objs = _records(False)[iid]
      assert b["box_valid"][i].sum() == len(objs)
      if iid in LABELS:
        assert b["labels"][i][b["box_valid"][i]].tolist() == [0, 11, 79]
        continue
      img = helpers.denormalize(b["image"][i], config)
      errors = helpers.alignment_errors(img, b["boxes"][i], b["labels"][i], b["box_valid"][i],
                                        b["image_size"][i])
      assert errors and max(errors) <= 1.6, (iid, errors)
  assert it.stats["images_used"] == len(ids) and it.stats["images_unreadable"] == 0


def test_labels_map_back_to_coco_category_ids(tmp_path):
  config = _config(tmp_path)
  ids = datasets.label_to_category_id(DataConfig.from_config(config))
  assert ids.shape == (80,) and ids[0] == 1 and ids[11] == 13 and ids[79] == 90
  with _mock(with_bad=False):
    gt = datasets.coco_ground_truth(DataConfig.from_config(config))
  assert len(gt["categories"]) == 80 and gt["categories"][79] == {"id": 90, "name": "toothbrush"}
  got = sorted(a["category_id"] for a in gt["annotations"] if a["image_id"] == 6)
  assert got == [1, 13, 90]
  boxes = [a["bbox"] for a in gt["annotations"] if a["image_id"] == 1]
  np.testing.assert_allclose(boxes[0], [4, 6, 26, 20], atol=1e-3)   # absolute xywh again


def test_training_batches_are_augmented_and_aligned(tmp_path):
  config = _config(tmp_path)
  with _mock(with_bad=False):
    it = iterators.make_train_iterator(DataConfig.from_config(config))
    batches = [next(it) for _ in range(6)]
  sizes = set()
  for b in batches:
    assert b["image"].shape == (2, 96, 96, 3) and b["example_valid"].all()
    for i in range(2):
      sizes.add(tuple(b["image_size"][i]))
      if int(b["image_id"][i]) in LABELS:
        continue
      img = helpers.denormalize(b["image"][i], config)
      # JPEG data: the edge pixels of slivers left by a crop are blends; not compared.
      errors = helpers.alignment_errors(img, b["boxes"][i], b["labels"][i], b["box_valid"][i],
                                        b["image_size"][i], min_size=3)
      assert max(errors, default=0) <= 1.6, errors
  assert len(sizes) > 1  # multi-scale training


# ----------------------------------------------------------------------------- bad records

@pytest.fixture(scope="module")
def bad_eval(tmp_path_factory):
  config = _config(tmp_path_factory.mktemp("coco_bad"))
  with _mock(with_bad=True):
    it = iterators.make_eval_iterator(DataConfig.from_config(config))
    batches = list(it)
  rows = {}
  for b in batches:
    for i in np.nonzero(b["example_valid"])[0]:
      rows[int(b["image_id"][i])] = {k: v[i] for k, v in b.items()}
  return config, rows, it.stats


def _case(name):
  return next(i for i, (n, _, _) in BAD.items() if n == name)


def test_bad_records_never_crash_and_all_counts_add_up(bad_eval):
  _, rows, stats = bad_eval
  n = len(_records(True))
  assert stats["images_seen"] == n
  assert stats["images_used"] + stats["images_unreadable"] == n
  assert set(rows) == set(_records(True)) - {_case("truncated"), _case("corrupt")}
  assert "images_unreadable=2" in coco_folder.format_stats(stats)   # what the logs report


@pytest.mark.parametrize("case", ["truncated", "corrupt"])
def test_unreadable_image_skipped_and_counted(bad_eval, case):
  _, rows, stats = bad_eval
  assert _case(case) not in rows
  assert stats["images_unreadable"] == 2


@pytest.mark.parametrize("case,key", [("grayscale", "images_grayscale"),
                                      ("cmyk", "images_cmyk"), ("png", "images_png")])
def test_other_image_data_decoded_to_rgb_and_counted(bad_eval, case, key):
  config, rows, stats = bad_eval
  row = rows[_case(case)]
  assert stats[key] == 1
  img = helpers.denormalize(row["image"], config)
  if case == "grayscale":  # replicated to 3 equal channels; the colours become grays
    h, w = row["image_size"]
    assert (img[:h, :w, 0] == img[:h, :w, 1]).all() and (img[:h, :w, 1] == img[:h, :w, 2]).all()
    assert row["box_valid"].sum() == 3
    return
  errors = helpers.alignment_errors(img, row["boxes"], row["labels"], row["box_valid"],
                                    row["image_size"])
  assert len(errors) == 3 and max(errors) <= 1.6, errors


def test_zero_area_boxes_dropped_and_counted(bad_eval):
  _, rows, stats = bad_eval
  row = rows[_case("zero_area")]
  assert row["box_valid"].sum() == 3 and stats["boxes_invalid_dropped"] == 2


def test_image_without_annotations_kept_in_eval_and_counted(bad_eval):
  _, rows, stats = bad_eval
  assert not rows[_case("no_annotations")]["box_valid"].any()
  assert not rows[_case("crowd_only")]["box_valid"].any()
  assert stats["images_without_annotations"] == 2 and stats["boxes_crowd_dropped"] == 1


def test_more_boxes_than_max_boxes_truncated_and_counted(bad_eval):
  _, rows, stats = bad_eval
  row = rows[_case("many_boxes")]
  assert row["box_valid"].all() and row["boxes"].shape == (MAX_BOXES, 4)
  assert stats["images_truncated"] == 1 and stats["boxes_truncated"] == 12 - MAX_BOXES


def test_training_on_bad_records_skips_and_counts(tmp_path):
  config = _config(tmp_path)
  config.augment = False
  with _mock(with_bad=True):
    it = iterators.make_train_iterator(DataConfig.from_config(config))
    ids = [int(i) for _ in range(12) for i in next(it)["image_id"]]
  stats = it.stats
  skipped = {_case("truncated"), _case("corrupt"), _case("no_annotations"), _case("crowd_only")}
  assert not skipped & set(ids)
  assert set(ids) == set(_records(True)) - skipped   # ~1.5 epochs: every usable image
  assert stats["images_unreadable"] >= 2 and stats["images_without_annotations"] >= 2
  assert stats["images_seen"] == (stats["images_used"] + stats["images_unreadable"] +
                                  stats["images_without_annotations"])


def test_prepare_command_uses_the_manual_dir(monkeypatch, tmp_path, capsys):
  seen = {}

  def fake_prepare(self, *args, download_config=None, **kwargs):
    seen.update(name=self.info.full_name, data_dir=str(self.data_dir),
                manual_dir=str(download_config.manual_dir))

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_prepare)
  coco_tfds.main(["--data_dir", str(tmp_path), "--manual_dir", str(tmp_path / "zips")])
  assert seen["name"].startswith("coco/2017/")
  assert seen["data_dir"].startswith(str(tmp_path)) and seen["manual_dir"] == str(tmp_path / "zips")
  assert "prepared coco/2017" in capsys.readouterr().out
