"""Pipeline: batch interface, canvases per step, exact resume, per-host sharding, eval once."""

import numpy as np
import pytest

from configs import common
import data_helpers as helpers
from focus_detr_jax.data import iterators
from focus_detr_jax.data.datasets import DataConfig

CATS = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}, {"id": 3, "name": "blue"}]
CANVASES = ((64, 96), (96, 64))


def _mixed_images(n=12, seed=0):
  """Alternating landscape (48x72) and portrait (72x48) images with 3 disjoint rectangles."""
  rng = np.random.default_rng(seed)
  out = []
  for k in range(n):
    hw = (48, 72) if k % 2 == 0 else (72, 48)
    rects, anns = [], []
    band = hw[0] // 3
    for label in range(3):
      w, h = int(rng.integers(6, hw[1] // 2)), int(rng.integers(5, band - 1))
      x, y = int(rng.integers(0, hw[1] - w)), label * band + int(rng.integers(0, band - h))
      rects.append((x, y, x + w, y + h))
      anns.append({"category_id": label + 1, "bbox": [x, y, w, h], "area": w * h})
    img = helpers.drawn_image(hw, rects)
    out.append({"file_name": f"{k}.png", "data": helpers.encode(img, "PNG"), "id": 1000 + k,
                "height": hw[0], "width": hw[1], "annotations": anns})
  return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("mixed"))
  train = helpers.write_coco_folder(root, "train", _mixed_images(12), CATS)
  val = helpers.write_coco_folder(root, "val", _mixed_images(7, seed=1), CATS)
  c = helpers.small_config(root, size=96, dataset="coco_folder")
  c.folder.train_images, c.folder.train_annotations = train
  c.folder.eval_images, c.folder.eval_annotations = val
  c.canvases = CANVASES
  # Training sizes larger than the canvases: exercises the scale-down-to-fit path too.
  c.train_scales = (48, 56, 64, 72)
  c.train_max_size = 96
  c.crop_resize_scales = (40, 48)
  c.crop_size_range = (24, 40)
  c.eval_scale = 64
  c.eval_max_size = 96
  c.batch_size = 2
  c.eval_batch_size = 2
  c.max_boxes = 8
  return c


def _same(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_interface(config):
  it = iterators.make_train_iterator(DataConfig.from_config(config))
  b = next(it)
  h, w = b["image"].shape[1:3]
  assert (h, w) in CANVASES
  want = {"image": ((2, h, w, 3), np.float32), "pixel_valid": ((2, h, w), np.bool_),
          "image_size": ((2, 2), np.int32), "orig_size": ((2, 2), np.int32),
          "image_id": ((2,), np.int64), "boxes": ((2, 8, 4), np.float32),
          "labels": ((2, 8), np.int32), "box_valid": ((2, 8), np.bool_),
          "example_valid": ((2,), np.bool_)}
  assert {k: (v.shape, v.dtype.type) for k, v in b.items()} == want
  for i in range(2):
    ih, iw = b["image_size"][i]
    assert b["pixel_valid"][i, :ih, :iw].all() and not b["pixel_valid"][i, ih:].any()
    assert not b["pixel_valid"][i, :, iw:].any()
    assert not b["image"][i][~b["pixel_valid"][i]].any()  # zero padding after normalisation
    # Black background pixels normalise to -mean/std exactly.
    corner = helpers.denormalize(b["image"][i, :ih, :iw], config)
    assert corner.max() == 255
  assert b["labels"][b["box_valid"]].max() <= 2
  assert ((b["boxes"][b["box_valid"]] > 0) & (b["boxes"][b["box_valid"]] <= 1)).all()


def test_normalisation_is_exact():
  c = common.get_data_config()
  it = iterators.DataIterator.__new__(iterators.DataIterator)
  it._training = True  # pylint: disable=protected-access
  it.normalize_on_host = True
  mean = np.asarray(c.pixel_mean, np.float32)
  std = np.asarray(c.pixel_std, np.float32)
  it._mean, it._std = mean, std  # pylint: disable=protected-access
  u8 = np.random.default_rng(0).integers(0, 256, (1, 4, 5, 3)).astype(np.uint8)
  el = {"image": u8, "image_size": np.array([[3, 4]]), "orig_size": np.array([[3, 4]]),
        "image_id": np.array([1]), "boxes": np.zeros((1, 2, 4)), "labels": np.zeros((1, 2)),
        "box_valid": np.zeros((1, 2), bool)}
  out = it._finalize(el, np.array([True]))  # pylint: disable=protected-access
  ref = (u8.astype(np.float32) - mean) / std
  np.testing.assert_array_equal(out["image"][0, :3, :4], ref[0, :3, :4])
  assert not out["image"][0, 3:].any() and not out["image"][0, :, 4:].any()
  # Every uint8 value of every channel, against the detectron2 formula in float32.
  every = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1), (1, 16, 16, 3))
  image, pixel_valid = iterators.normalize_batch(every, np.array([[16, 16]]), mean, std)
  np.testing.assert_array_equal(image, (every.astype(np.float32) - mean) / std)
  assert pixel_valid.all()


def test_canvas_follows_the_step_schedule_and_aspect(config):
  it = iterators.make_train_iterator(DataConfig.from_config(config))
  shapes = []
  for step in range(8):
    b = next(it)
    canvas = b["image"].shape[1:3]
    assert canvas == helpers.canvas_for_step(config, step)
    shapes.append(canvas)
    # Grouped by the orientation of the augmented image (the crop's, or the original's).
    size = b["image_size"]
    if canvas == CANVASES[0]:
      assert (size[:, 0] < size[:, 1]).all()
    else:
      assert (size[:, 0] >= size[:, 1]).all()
  assert len(set(shapes)) == 2


def test_augmented_batches_keep_boxes_on_pixels(config):
  it = iterators.make_train_iterator(DataConfig.from_config(config))
  n = 0
  for _ in range(8):
    b = next(it)
    for i in range(b["image"].shape[0]):
      img = helpers.denormalize(b["image"][i], config)
      errors = helpers.alignment_errors(img, b["boxes"][i], b["labels"][i], b["box_valid"][i],
                                        b["image_size"][i])
      assert max(errors, default=0) <= 1.6, errors
      n += len(errors)
  assert n > 10
  assert it.stats["images_rescaled_to_fit"] > 0


def test_exact_resume_from_a_checkpoint(config, tmp_path):
  it = iterators.make_train_iterator(DataConfig.from_config(config))
  for _ in range(3):
    next(it)
  path = it.save(str(tmp_path / "input"))
  stats = it.stats
  expected = [next(it) for _ in range(4)]
  fresh = iterators.make_train_iterator(DataConfig.from_config(config))
  fresh.restore(path)
  assert fresh.stats == stats
  for want in expected:
    assert _same(next(fresh), want)


def test_order_is_deterministic_from_the_seed(config):
  a = [next(iterators.make_train_iterator(DataConfig.from_config(config))) for _ in range(1)]
  b = [next(iterators.make_train_iterator(DataConfig.from_config(config))) for _ in range(1)]
  assert _same(a[0], b[0])
  other = config.copy_and_resolve_references()
  other.seed = 5
  it = iterators.make_train_iterator(DataConfig.from_config(other))
  assert not _same(next(it), a[0]) or not _same(next(it), a[0])


def test_hosts_read_disjoint_shards_and_agree_on_canvases(config):
  its = [iterators.make_train_iterator(DataConfig.from_config(config), process_index=p,
                                       process_count=2)
         for p in range(2)]
  ids = [set(), set()]
  # ~4 epochs of each host's 6 images: the aspect-group schedule draws every image equally
  # often in the long run (within 2 draws, tests/test_data_schedule.py), not exactly per epoch.
  for _ in range(24):
    batches = [next(it) for it in its]
    assert batches[0]["image"].shape == batches[1]["image"].shape
    assert batches[0]["image"].shape[0] == 1  # global batch 2 over 2 hosts
    for p in range(2):
      ids[p].update(batches[p]["image_id"].tolist())
  assert ids[0] and ids[1] and not ids[0] & ids[1]
  assert ids[0] | ids[1] == set(range(1000, 1012))  # together: the whole training split


def test_eval_every_image_exactly_once(config):
  batches = list(iterators.make_eval_iterator(DataConfig.from_config(config)))
  ids = np.concatenate([b["image_id"][b["example_valid"]] for b in batches])
  assert sorted(ids.tolist()) == list(range(1000, 1007))
  # 4 landscape + 3 portrait images, batch 2: 2 + 2 batches, each canvas's last one padded.
  assert [b["image"].shape[1:3] for b in batches] == [CANVASES[0]] * 2 + [CANVASES[1]] * 2
  assert [b["example_valid"].tolist() for b in batches] == [[True, True]] * 3 + [[True, False]]
  for b in batches:
    assert not b["box_valid"][~b["example_valid"]].any()
    for i in np.nonzero(b["example_valid"])[0]:
      img = helpers.denormalize(b["image"][i], config)
      errors = helpers.alignment_errors(img, b["boxes"][i], b["labels"][i], b["box_valid"][i],
                                        b["image_size"][i])
      assert len(errors) == 3 and max(errors) <= 1.6


def test_eval_on_two_hosts_same_batches_per_canvas(config):
  runs = [list(iterators.make_eval_iterator(DataConfig.from_config(config), process_index=p,
                                            process_count=2))
          for p in range(2)]
  assert [b["image"].shape for b in runs[0]] == [b["image"].shape for b in runs[1]]
  ids = [np.concatenate([b["image_id"][b["example_valid"]] for b in r]).tolist() for r in runs]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(1000, 1007))


def test_exact_eval_mode(config):
  c = config.copy_and_resolve_references()
  c.eval_exact = True
  batches = list(iterators.make_eval_iterator(DataConfig.from_config(c)))
  assert len(batches) == 7
  for b in batches:
    assert b["image"].shape[1:3] == tuple(b["image_size"][0]) and b["pixel_valid"].all()


def test_config_presets():
  coco = common.get_data_config()
  assert coco.dataset == "coco" and coco.max_boxes == 100 and coco.train_max_size == 1333
  assert tuple(coco.train_scales) == tuple(range(480, 801, 32))
  syn = common.get_data_config("synthetic")
  assert syn.dataset == "synthetic" and tuple(syn.canvases) == ((256, 256),)
  with pytest.raises(ValueError):
    common.get_data_config("nope")
