"""The training stream with scale-bucketed canvases: each image equally often whatever its
orientation, the step's scale and canvas, exact resume, hosts that agree."""

import collections

import numpy as np
import pytest

import data_helpers as helpers
from focus_detr_jax.data import device
from focus_detr_jax.data import iterators
from focus_detr_jax.data import streams
from focus_detr_jax.data.datasets import DataConfig

CATS = [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]
SCALE_BUCKETS = ((48, 56), (64, 72))
# Group-major: landscape (scale buckets 48-56, 64-72), then portrait.
CANVASES = ((56, 84), (72, 108), (84, 56), (108, 72))


def _images(landscape, portrait, seed=0):
  """`landscape` 48x72 then `portrait` 72x48 images, two rectangles each."""
  rng = np.random.default_rng(seed)
  out = []
  for k in range(landscape + portrait):
    hw = (48, 72) if k < landscape else (72, 48)
    rects, anns = [], []
    for label in range(2):
      w, h = int(rng.integers(8, 20)), int(rng.integers(8, 20))
      x, y = int(rng.integers(0, hw[1] - w)), label * hw[0] // 2 + int(rng.integers(0, 4))
      rects.append((x, y, x + w, y + h))
      anns.append({"category_id": label + 1, "bbox": [x, y, w, h], "area": w * h})
    out.append({"file_name": f"{k}.png", "data": helpers.encode(helpers.drawn_image(hw, rects),
                                                                "PNG"),
                "id": 2000 + k, "height": hw[0], "width": hw[1], "annotations": anns})
  return out


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sched"))
  train = helpers.write_coco_folder(root, "train", _images(8, 4), CATS)
  val = helpers.write_coco_folder(root, "val", _images(2, 1, seed=1), CATS)
  c = helpers.small_config(root, size=96, dataset="coco_folder")
  c.folder.train_images, c.folder.train_annotations = train
  c.folder.eval_images, c.folder.eval_annotations = val
  c.train_scales = (48, 56, 64, 72)
  c.train_max_size = 200
  c.scale_buckets = SCALE_BUCKETS
  c.group_bounds = (1.0,)
  c.canvases = CANVASES
  c.crop_prob = 0.0            # groups = the original orientation: exact counts below
  c.eval_scale = 64
  c.eval_max_size = 200
  c.batch_size = 2
  c.shuffle_buffer = 4
  c.max_boxes = 4
  return c


def test_images_are_drawn_uniformly_whatever_their_orientation(config):
  """8 landscape + 4 portrait images: 2/3 of the steps are landscape and, after 3 epochs'
  worth of steps, every image has been seen 3 times (a fixed 50/50 schedule would show each
  portrait image twice as often as each landscape image)."""
  assert streams.train_schedule(DataConfig.from_config(config)).group_counts in (
      (2, 1), (666667, 333333))
  it = iterators.make_train_iterator(DataConfig.from_config(config))
  counts = collections.Counter()
  epochs = 3
  for _ in range(12 * epochs // 2):
    counts.update(next(it)["image_id"].tolist())
  assert sorted(counts) == list(range(2000, 2012))
  assert max(counts.values()) - min(counts.values()) <= 2
  assert sum(counts[i] for i in range(2000, 2008)) / 8 == pytest.approx(epochs, abs=0.5)
  assert sum(counts[i] for i in range(2008, 2012)) / 4 == pytest.approx(epochs, abs=0.5)


def test_scale_and_canvas_follow_the_step(config):
  schedule = streams.train_schedule(DataConfig.from_config(config))
  it = iterators.make_train_iterator(DataConfig.from_config(config))
  shapes = set()
  for step in range(16):
    b = next(it)
    plan = helpers.plan_for_step(step, schedule)
    assert b["image"].shape[1:3] == plan.canvas == helpers.canvas_for_step(config, step)
    shapes.add(plan.canvas)
    # No crop: every image's short side is the step's scale, its orientation the step's group.
    assert (b["image_size"].min(axis=1) == plan.scale).all()
    assert ((b["image_size"][:, 0] >= b["image_size"][:, 1]) == (plan.group == 1)).all()
  assert len(shapes) >= 3 and shapes <= set(CANVASES)
  assert streams.train_shapes(DataConfig.from_config(config)) == CANVASES
  assert it.stats["images_rescaled_to_fit"] == 0


def test_crop_branch_images_fit_or_are_counted(config):
  c = config.copy_and_resolve_references()
  c.crop_prob = 1.0
  c.crop_resize_scales = (48, 60)
  c.crop_size_range = (30, 48)
  it = iterators.make_train_iterator(DataConfig.from_config(c))
  rescaled = 0
  for step in range(8):
    b = next(it)
    h, w = b["image"].shape[1:3]
    assert (b["image_size"][:, 0] <= h).all() and (b["image_size"][:, 1] <= w).all()
    for i in range(2):
      img = helpers.denormalize(b["image"][i], c)
      errors = helpers.alignment_errors(img, b["boxes"][i], b["labels"][i], b["box_valid"][i],
                                        b["image_size"][i])
      assert max(errors, default=0) <= 1.6, errors
    rescaled += int((b["image_size"].min(axis=1) != helpers.plan_for_step(
        step, streams.train_schedule(DataConfig.from_config(c))).scale).sum())
  assert it.stats["images_rescaled_to_fit"] == rescaled


def test_exact_resume_with_scale_buckets(config, tmp_path):
  it = iterators.make_train_iterator(DataConfig.from_config(config))
  for _ in range(5):
    next(it)
  path = it.save(str(tmp_path / "input"))
  want = [next(it) for _ in range(5)]
  fresh = iterators.make_train_iterator(DataConfig.from_config(config))
  fresh.restore(path)
  for w in want:
    got = next(fresh)
    assert all(np.array_equal(got[k], w[k]) for k in w)


def test_two_hosts_use_the_same_canvas_at_every_step(config):
  its = [iterators.make_train_iterator(DataConfig.from_config(config), process_index=p,
                                       process_count=2)
         for p in range(2)]
  for step in range(10):
    shapes = {next(it)["image"].shape[1:3] for it in its}
    assert shapes == {helpers.canvas_for_step(config, step)}


def test_a_dataset_without_portrait_images_trains(tmp_path):
  """Measured weights give an absent orientation no steps (it used to stop the input)."""
  train = helpers.write_coco_folder(str(tmp_path), "train", _images(4, 0), CATS)
  c = helpers.small_config(str(tmp_path), size=96, dataset="coco_folder")
  c.folder.train_images, c.folder.train_annotations = train
  c.canvases = ((96, 96), (96, 96))
  c.group_bounds = (1.0,)
  c.crop_prob = 0.0
  c.batch_size = 2
  assert streams.train_schedule(DataConfig.from_config(c)).group_counts[1] == 0
  it = iterators.make_train_iterator(DataConfig.from_config(c))
  for _ in range(6):
    assert next(it)["image"].shape == (2, 96, 96, 3)


def test_uint8_batches_normalised_on_device_equal_the_host_ones(config):
  host = next(iterators.make_train_iterator(DataConfig.from_config(config)))
  raw = next(iterators.make_train_iterator(DataConfig.from_config(config), normalize_on_host=False))
  assert raw["image"].dtype == np.uint8 and "pixel_valid" not in raw
  out = device.normalize_on_device(raw, config.pixel_mean, config.pixel_std)
  np.testing.assert_array_equal(np.asarray(out["image"]), host["image"])
  np.testing.assert_array_equal(np.asarray(out["pixel_valid"]), host["pixel_valid"])
