"""Transforms: detectron2 size rules, flips, crops, canvases; boxes stay on their pixels."""

import dataclasses
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import common
import data_helpers as helpers
from focus_detr_jax.data import canvas as canvas_lib
from focus_detr_jax.data import datasets
from focus_detr_jax.data import transforms

RECTS = [(10, 12, 50, 40), (70, 20, 110, 90), (20, 60, 45, 95), (100, 5, 118, 15)]


def _detectron2_size(h, w, short, max_size):
  """detectron2 ResizeShortestEdge.get_output_shape, verbatim."""
  scale = short * 1.0 / min(h, w)
  newh, neww = (short, scale * w) if h < w else (scale * h, short)
  if max(newh, neww) > max_size:
    scale = max_size * 1.0 / max(newh, neww)
    newh, neww = newh * scale, neww * scale
  return int(newh + 0.5), int(neww + 0.5)


@pytest.mark.parametrize("hw,short,max_size", [
    ((480, 640), 800, 1333), ((640, 480), 800, 1333), ((427, 640), 512, 1333),
    ((100, 1000), 800, 1333), ((1000, 100), 608, 1333), ((333, 500), 800, 1333),
    ((500, 333), 480, 1333), ((96, 128), 112, 128), ((375, 500), 600, 10 ** 9)])
def test_resize_shortest_edge_matches_detectron2(hw, short, max_size):
  got = transforms.resize_shortest_edge_size(tf.constant(hw), short, max_size).numpy()
  assert tuple(got) == _detectron2_size(*hw, short, max_size)


def _example(rects=RECTS, hw=(100, 120), crowd=None, fmt="PNG"):
  img = helpers.drawn_image(hw, rects)
  h, w = hw
  bbox = np.array([[y0 / h, x0 / w, y1 / h, x1 / w] for x0, y0, x1, y1 in rects], np.float32)
  return {
      "image": tf.constant(helpers.encode(img, fmt)),
      "image/id": tf.constant(7, tf.int64),
      "objects": {
          "bbox": tf.constant(bbox.reshape(-1, 4)),
          "label": tf.constant(np.arange(len(rects)), tf.int64),
          "is_crowd": tf.constant(np.zeros(len(rects), bool) if crowd is None else crowd),
      },
  }


def _cfg(**kw):
  base = dataclasses.replace(
      datasets.DataConfig.from_config(common.get_data_config("coco")),
      max_boxes=10, train_scales=(64, 80, 96, 112), train_max_size=160,
      crop_resize_scales=(60, 80, 100), crop_size_range=(40, 90), eval_scale=96,
      eval_max_size=160)
  return dataclasses.replace(base, **kw)


def _check_aligned(out, tol=1.6):
  errors = helpers.alignment_errors(out["image"].numpy(), out["boxes"].numpy(),
                                    out["labels"].numpy(), out["box_valid"].numpy(),
                                    out["image_size"].numpy())
  assert errors and max(errors) <= tol, errors


@pytest.mark.parametrize("flip,crop", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_train_transform_keeps_boxes_on_pixels(flip, crop):
  cfg = _cfg(flip_prob=flip, crop_prob=crop)
  ex = _example()
  for i in range(6):
    out = helpers.train_example(ex, tf.constant([3, i], tf.int64), (160, 160), cfg)
    assert bool(out["keep"])
    _check_aligned(out)
    h, w = out["image_size"].numpy()
    # Padding bottom/right is zero and the canvas is static.
    assert out["image"].shape == (160, 160, 3)
    assert not out["image"].numpy()[h:].any() and not out["image"].numpy()[:, w:].any()


def test_flip_moves_objects_and_boxes_together():
  ex = _example()
  a = helpers.train_example(ex, tf.constant([0, 0], tf.int64), (160, 160),
                               _cfg(flip_prob=0.0, crop_prob=0.0, train_scales=(100,)))
  b = helpers.train_example(ex, tf.constant([0, 0], tf.int64), (160, 160),
                               _cfg(flip_prob=1.0, crop_prob=0.0, train_scales=(100,)))
  ba, bb = a["boxes"].numpy(), b["boxes"].numpy()
  valid = a["box_valid"].numpy()
  np.testing.assert_allclose(bb[valid, 0], 1.0 - ba[valid, 0], atol=1e-6)
  np.testing.assert_allclose(bb[valid, 1:], ba[valid, 1:], atol=1e-6)
  h, w = a["image_size"].numpy()
  np.testing.assert_array_equal(a["image"].numpy()[:h, :w], b["image"].numpy()[:h, :w][:, ::-1])


def test_hflip_twice_is_identity():
  img = tf.constant(np.random.default_rng(0).integers(0, 255, (5, 7, 3)), tf.uint8)
  boxes = tf.constant([[1.0, 2.0, 4.0, 5.0], [0.0, 0.0, 7.0, 5.0]])
  i2, b2 = transforms.hflip(*transforms.hflip(img, boxes))
  np.testing.assert_array_equal(i2.numpy(), img.numpy())
  np.testing.assert_allclose(b2.numpy(), boxes.numpy())


def _random_crop(image, boxes, labels, crop_range, keys):
  """detectron2 RandomCrop("absolute_range") on `image` (what the training stream composes)."""
  box = transforms.crop_box(tf.shape(image)[0], tf.shape(image)[1], crop_range, keys)
  return transforms.crop(image, boxes, labels, box)


def test_crop_sizes_follow_absolute_range():
  img = tf.zeros([300, 500, 3], tf.uint8)
  boxes = tf.constant([[0.0, 0.0, 500.0, 300.0]])
  labels = tf.constant([0])
  sizes = []
  for i in range(30):
    keys = tf.random.experimental.stateless_split(tf.constant([1, i], tf.int64), 4)
    out, b, _, removed = _random_crop(img, boxes, labels, (100, 200), keys)
    sizes.append(out.shape[:2])
    # The whole-image box becomes the crop window.
    np.testing.assert_allclose(b.numpy()[0], [0, 0, out.shape[1], out.shape[0]])
    assert int(removed) == 0
  hs, ws = zip(*sizes)
  assert min(hs) >= 100 and max(hs) <= 200 and min(ws) >= 100 and max(ws) <= 200
  assert len(set(sizes)) > 5
  # Images smaller than the range are cropped to at most their size (detectron2 min(h, lo)).
  keys = tf.random.experimental.stateless_split(tf.constant([1, 0], tf.int64), 4)
  small, _, _, _ = _random_crop(tf.zeros([50, 60, 3], tf.uint8), boxes, labels,
                                          (100, 200), keys)
  assert small.shape[:2] == (50, 60)


def test_crop_removes_boxes_outside_and_counts_them():
  img = tf.zeros([100, 100, 3], tf.uint8)
  boxes = tf.constant([[0.0, 0.0, 10.0, 10.0], [90.0, 90.0, 100.0, 100.0]])
  found = set()
  for i in range(40):
    keys = tf.random.experimental.stateless_split(tf.constant([2, i], tf.int64), 4)
    _, b, _, removed = _random_crop(img, boxes, tf.constant([0, 1]), (50, 60), keys)
    assert int(removed) + int(b.shape[0]) == 2
    found.add(int(removed))
  assert found & {1, 2}


def test_random_draws_are_deterministic_per_key():
  ex = _example()
  cfg = _cfg()
  k = tf.constant([5, 11], tf.int64)
  a = helpers.train_example(ex, k, (160, 160), cfg)
  b = helpers.train_example(ex, k, (160, 160), cfg)
  for key in a:
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
  sizes = {tuple(helpers.train_example(ex, tf.constant([5, i], tf.int64), (160, 160), cfg)[
      "image_size"].numpy()) for i in range(12)}
  assert len(sizes) > 2


def test_eval_transform_size_and_fit_to_canvas():
  ex = _example(hw=(100, 120))
  out = transforms.eval_example(ex, (160, 160), _cfg())
  # Shortest edge 96, max 160: (96, 115).
  assert tuple(out["image_size"].numpy()) == _detectron2_size(100, 120, 96, 160)
  _check_aligned(out)
  assert int(out["stats"].numpy()[transforms.EXAMPLE_STATS.index("images_rescaled_to_fit")]) == 0
  # A landscape image in a portrait canvas does not fit: scaled down, boxes follow.
  out = transforms.eval_example(ex, (120, 64), _cfg())
  h, w = out["image_size"].numpy()
  assert h <= 120 and w <= 64 and w == 64
  assert int(out["stats"].numpy()[transforms.EXAMPLE_STATS.index("images_rescaled_to_fit")]) == 1
  _check_aligned(out)
  # Exact mode: no canvas, the image keeps its resized size.
  out = transforms.eval_example(ex, None, _cfg())
  assert out["image"].shape[:2] == tuple(out["image_size"].numpy())


def test_orig_size_and_image_id():
  out = transforms.eval_example(_example(hw=(100, 120)), (160, 160), _cfg())
  assert tuple(out["orig_size"].numpy()) == (100, 120)
  assert int(out["image_id"]) == 7


def test_clean_boxes_drops_and_clips_and_counts():
  bbox = tf.constant([
      [0.1, 0.1, 0.5, 0.5],     # fine
      [-0.2, 0.5, 0.5, 1.3],    # partly outside: clipped
      [0.3, 0.3, 0.3, 0.6],     # zero height
      [1.2, 1.2, 1.5, 1.5],     # entirely outside
      [np.nan, 0.1, 0.2, 0.2],  # not finite
      [0.6, 0.6, 0.4, 0.8],     # inverted
      [0.1, 0.1, 0.9, 0.9],     # crowd
  ], tf.float32)
  crowd = tf.constant([False] * 6 + [True])
  boxes, labels, _, stats = transforms.clean_boxes(bbox, tf.range(7), crowd, tf.constant([100, 200]),
                                                   drop_crowd=True)
  np.testing.assert_array_equal(labels.numpy(), [0, 1])
  np.testing.assert_allclose(boxes.numpy(), [[20, 10, 100, 50], [100, 0, 200, 50]], atol=1e-4)
  assert {k: int(v) for k, v in stats.items()} == {
      "boxes_crowd_dropped": 1, "boxes_invalid_dropped": 4, "boxes_clipped": 1}


def test_crowd_boxes_dropped_and_crowd_only_images_skipped_in_training():
  ex = _example(crowd=np.array([True, False, True, False]))
  out = helpers.train_example(ex, tf.constant([0, 0], tf.int64), (160, 160),
                                 _cfg(crop_prob=0.0))
  assert bool(out["keep"]) and int(out["box_valid"].numpy().sum()) == 2
  assert set(out["labels"].numpy()[out["box_valid"].numpy()]) == {1, 3}
  ex = _example(crowd=np.ones(4, bool))
  out = helpers.train_example(ex, tf.constant([0, 0], tf.int64), (160, 160), _cfg())
  assert not bool(out["keep"])
  assert int(out["stats"].numpy()[transforms.EXAMPLE_STATS.index(
      "images_without_annotations")]) == 1


def test_more_boxes_than_max_boxes_truncated_and_counted():
  boxes = tf.constant(np.tile([[1.0, 1.0, 5.0, 5.0]], (7, 1)), tf.float32)
  tb, tl, valid, truncated = transforms.targets_from_boxes(boxes, tf.range(7), tf.constant([10, 10]),
                                                           max_boxes=5)
  assert tb.shape == (5, 4) and tl.shape == (5,) and int(valid.numpy().sum()) == 5
  assert int(truncated) == 2
  np.testing.assert_allclose(tb.numpy()[0], [0.3, 0.3, 0.4, 0.4], atol=1e-6)
  tb, _, valid, truncated = transforms.targets_from_boxes(boxes[:2], tf.range(2),
                                                          tf.constant([10, 10]), max_boxes=5)
  assert valid.numpy().tolist() == [True, True, False, False, False] and int(truncated) == 0
  assert not tb.numpy()[2:].any()


def test_canvas_routing_and_fit():
  canvases = ((80, 120), (120, 80))
  for hw, want in [((60, 100), 0), ((100, 60), 1), ((50, 50), 0), ((0, 0), 0)]:
    assert int(canvas_lib.tf_canvas_index(tf.constant(hw, tf.int32), canvases)) == want
  got, rescaled = canvas_lib.tf_fit_size(tf.constant([100, 200]), (80, 120))
  assert tuple(got.numpy()) == (60, 120) and bool(rescaled)
  got, rescaled = canvas_lib.tf_fit_size(tf.constant([80, 100]), (80, 120))
  assert tuple(got.numpy()) == (80, 100) and not bool(rescaled)


def _encoded_variants():
  """name -> encoded bytes of the same drawn image in many containers and colour modes."""
  img = helpers.drawn_image((30, 50), RECTS[:1], background=90)
  out = {}
  for name, fmt, mode, kw in [
      ("jpeg", "JPEG", None, {}), ("jpeg_progressive", "JPEG", None, {"progressive": True}),
      ("jpeg_gray", "JPEG", "L", {}), ("jpeg_cmyk", "JPEG", "CMYK", {}),
      ("png", "PNG", None, {}), ("png_gray", "PNG", "L", {}), ("png_rgba", "PNG", "RGBA", {}),
      ("png_palette", "PNG", "P", {}), ("gif", "GIF", "P", {}), ("bmp", "BMP", None, {})]:
    out[name] = helpers.encode(img, fmt, mode, **kw)
  exif = Image.Exif()
  exif[0x0112] = 6
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
  out["jpeg_exif"] = buf.getvalue()
  return out


def test_header_info_in_graph_matches_pil():
  channels = {"jpeg": 3, "jpeg_progressive": 3, "jpeg_exif": 3, "jpeg_gray": 1, "jpeg_cmyk": 4,
              "png": 3, "png_gray": 1, "png_rgba": 4, "png_palette": 3, "gif": 0, "bmp": 0}
  kinds = {"jpeg": canvas_lib.KIND_JPEG, "png": canvas_lib.KIND_PNG, "gif": canvas_lib.KIND_GIF,
           "bmp": canvas_lib.KIND_BMP}
  for name, data in _encoded_variants().items():
    hw, kind, c = canvas_lib.tf_encoded_image_info(tf.constant(data))
    assert tuple(hw.numpy()) == Image.open(io.BytesIO(data)).size[::-1] == (30, 50), name
    assert int(kind) == kinds[name.split("_")[0]] and int(c) == channels[name], name
  for junk in (b"", b"garbage", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"\xff\xd8" + b"\xff" * 50):
    assert tuple(canvas_lib.tf_encoded_image_size(tf.constant(junk)).numpy()) == (0, 0)


def test_decoding_matches_pil_and_counts_formats():
  """JPEG decoding is bit-identical to PIL (detectron2's reader) in every colour mode."""
  for name, data in _encoded_variants().items():
    # (EXIF orientation is not the decoder's business: folders apply it at preparation.)
    got = transforms.decode_image(tf.constant(data)).numpy()
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(got, want, err_msg=name)
    stats = {k: int(v) for k, v in transforms.image_format_counts(tf.constant(data)).items()}
    assert stats["images_png"] == name.startswith("png"), name
    assert stats["images_grayscale"] == name.endswith("gray"), name
    assert stats["images_cmyk"] == (name == "jpeg_cmyk"), name
    assert stats["images_gif_or_bmp"] == (name in ("gif", "bmp")), name
