"""scripts/predict.py end to end on the tiny config (in-process: one compilation, shared)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from focus_detr_jax import inference, visualize
from focus_detr_jax.data import iterators
from focus_detr_jax.data.datasets import DataConfig
from focus_detr_jax.predict import predict_on_host
from conftest import import_script

REPO = Path(__file__).resolve().parents[1]
# (h, w): identity resize (96x128 already has the eval size), upscaled, downscaled portrait.
SIZES = {"landscape.png": (96, 128), "small.jpg": (64, 80), "portrait.png": (200, 150)}


def _image(h, w, seed):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:h, :w]
  base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1)
  image = base.astype(np.uint8)
  y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
  image[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
  return image


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, tiny_config, tiny_model_and_variables):
  from focus_detr_jax.checkpoint import save_model_checkpoint
  _, variables = tiny_model_and_variables
  root = tmp_path_factory.mktemp("predict")
  ckpt = save_model_checkpoint(root / "model", variables, tiny_config)
  images_dir = root / "images"
  images_dir.mkdir()
  originals = {}
  for seed, (name, (h, w)) in enumerate(SIZES.items()):
    originals[name] = _image(h, w, seed)
    Image.fromarray(originals[name]).save(images_dir / name, quality=95)
  (images_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
  (images_dir / "notes.txt").write_text("not an image: ignored in folders")
  out = root / "out"
  status = import_script("predict").main([
      "predict", f"--checkpoint={ckpt}", f"--inputs={images_dir}", f"--output_dir={out}",
      "--tokens", "--batch_size=2", "--score_threshold=0.0"])
  return dict(status=status, out=out, ckpt=ckpt, images_dir=images_dir, originals=originals)


def test_detections_json_is_coco_results_in_original_pixels(predicted, tiny_config):
  assert predicted["status"] == 0
  out = predicted["out"]
  dets = json.loads((out / "detections.json").read_text())
  meta = json.loads((out / "images.json").read_text())
  # Files sorted: broken (id 0, skipped), landscape 1, portrait 2, small 3.
  by_name = {im["file_name"]: im for im in meta["images"]}
  assert set(by_name) == set(SIZES)
  assert {by_name[n]["id"] for n in SIZES} == {1, 2, 3}
  assert [c["id"] for c in meta["categories"]] == [1, 2, 3, 4]   # synthetic ids: label + 1
  assert dets and {d["image_id"] for d in dets} == {1, 2, 3}
  for d in dets:
    assert set(d) == {"image_id", "category_id", "bbox", "score"}
    assert d["category_id"] in (1, 2, 3, 4) and 0.0 <= d["score"] <= 1.0
  for name, (h, w) in SIZES.items():
    im = by_name[name]
    assert (im["height"], im["width"]) == (h, w)
    boxes = np.asarray([d["bbox"] for d in dets if d["image_id"] == im["id"]])
    assert 0 < len(boxes) <= tiny_config.model.num_select
    x, y, bw, bh = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (bw > 0).all() and (bh > 0).all()
    assert (x + bw <= w + 1e-3).all() and (y + bh <= h + 1e-3).all()


def test_boxes_equal_the_models_own_outputs(predicted, tiny_config, tiny_model_and_variables):
  """landscape.png (96x128) needs no resize: build its padded input by hand and run the model."""
  model, variables = tiny_model_and_variables
  dets = json.loads((predicted["out"] / "detections.json").read_text())
  got = sorted((d for d in dets if d["image_id"] == 1), key=lambda d: -d["score"])
  image = predicted["originals"]["landscape.png"]
  canvas = np.zeros((2, 128, 128, 3), np.uint8)
  canvas[0, :96, :128] = image
  sizes = np.asarray([[96, 128], [1, 1]], np.int32)
  data = tiny_config.data
  x = (canvas.astype(np.float32) - np.asarray(data.pixel_mean, np.float32)) / np.asarray(
      data.pixel_std, np.float32)
  pixel_valid = np.zeros((2, 128, 128), bool)
  pixel_valid[0, :96, :128] = True
  pixel_valid[1, :1, :1] = True
  x[~pixel_valid] = 0.0
  want, maps = predict_on_host(model, variables, x, pixel_valid, sizes, sizes,
                               num_select=tiny_config.model.num_select)
  keep = want["valid"][0]
  assert len(got) == keep.sum()
  boxes = want["boxes"][0][keep]
  np.testing.assert_allclose([d["score"] for d in got], want["scores"][0][keep], rtol=1e-5)
  np.testing.assert_allclose([d["bbox"] for d in got],
                             np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1),
                             atol=1e-3)
  assert [d["category_id"] for d in got] == list(want["labels"][0][keep] + 1)
  # Token maps: each layer updates min(focus, K_l) tokens; object tokens are among them.
  counts = np.minimum(maps["focus_token_nums"][:, None], maps["layer_counts"])
  np.testing.assert_array_equal(maps["updated"].sum(-1), counts)
  assert not (maps["objects"] & ~maps["updated"]).any()
  assert (maps["objects"][0].sum(-1) == tiny_config.model.topk_sa).all()


def test_overlays_tokens_and_the_corrupt_file(predicted):
  out = predicted["out"]
  for name, (h, w) in SIZES.items():
    stem = Path(name).stem
    with Image.open(out / "overlays" / f"{stem}.png") as im:
      assert im.size == (w, h) and im.mode == "RGB"
    with Image.open(out / "tokens" / f"{stem}.png") as im:
      scale = 320 / max(h, w)
      cell_h, cell_w = round(h * scale), round(w * scale)
      # 3 rows (heatmaps, updated, object tokens) x 5 columns (image + 4 levels), then the
      # legend strip.
      assert im.size == (5 * cell_w,
                         3 * (cell_h + visualize._TITLE_HEIGHT) + visualize.LEGEND_HEIGHT)
  assert sorted(p.name for p in (out / "overlays").iterdir()) == [
      "landscape.png", "portrait.png", "small.png"]
  skipped = json.loads((out / "skipped.json").read_text())
  assert len(skipped) == 1 and skipped[0]["input"].endswith("broken.jpg")
  assert "corrupt" in skipped[0]["reason"]


def test_usage_errors_and_nothing_readable(predicted, tmp_path):
  predict = import_script("predict")
  assert predict.main(["predict", f"--inputs={predicted['images_dir']}",
                       f"--output_dir={tmp_path}"]) == 2          # no model given
  assert predict.main(["predict", f"--checkpoint={predicted['ckpt']}",
                       f"--output_dir={tmp_path}"]) == 2          # no inputs
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  status = predict.main(["predict", f"--checkpoint={predicted['ckpt']}",
                         f"--inputs={bad},{tmp_path / 'missing.jpg'}",
                         f"--output_dir={tmp_path / 'out'}"])
  assert status == 1
  skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
  assert [s["reason"] for s in skipped][0] == "not found" and len(skipped) == 2
  assert json.loads((tmp_path / "out" / "detections.json").read_text()) == []


def test_training_images_for_tensorboard(predicted, tiny_config, tiny_model_and_variables):
  model, variables = tiny_model_and_variables
  image = predicted["originals"]["landscape.png"]
  network, size, canvas = inference.network_input(image, DataConfig.from_config(tiny_config))
  assert size == (96, 128) and canvas == (128, 128)
  u8 = np.stack([network, network])
  sizes = np.asarray([size, [1, 1]], np.int32)
  x, pixel_valid = iterators.normalize_batch(u8, sizes, tiny_config.data.pixel_mean,
                                            tiny_config.data.pixel_std)
  m = tiny_config.data.max_boxes
  boxes = np.zeros((2, m, 4), np.float32)
  boxes[0, 0] = (0.5, 0.5, 0.4, 0.4)
  batch = dict(image=x, pixel_valid=pixel_valid, image_size=sizes, orig_size=sizes,
               image_id=np.asarray([1, 0]), boxes=boxes, labels=np.zeros((2, m), np.int32),
               box_valid=np.arange(m)[None] < np.asarray([[1], [0]]),
               example_valid=np.asarray([True, False]))
  data = DataConfig.from_config(tiny_config)
  images = visualize.training_images(model, variables, batch, data, tiny_config.model.num_select,
                                     max_images=2, class_names=("a", "b", "c", "d"))
  assert set(images) == {"detections", "token_selection"}
  det, tok = images["detections"], images["token_selection"]
  assert det.shape == (1, 128, 128, 3) and det.dtype == np.uint8
  assert tok.ndim == 4 and tok.shape[0] == 1 and tok.shape[-1] == 3 and tok.dtype == np.uint8
  # The ground-truth box (white, 1 px) is drawn: its top edge at y = 0.3 * 96.
  assert (det[0, round(0.3 * 96), 60] == 255).all()
  assert visualize.training_images(model, variables, dict(batch, example_valid=np.zeros(
      2, bool)), data, tiny_config.model.num_select) == {}


def test_split_of_the_config_dataset(predicted, tmp_path):
  """--split reads the config's dataset (the tiny synthetic set) through the eval pipeline."""
  out = tmp_path / "split"
  status = import_script("predict").main([
      "predict", f"--checkpoint={predicted['ckpt']}", "--split=validation", "--max_images=3",
      f"--output_dir={out}", "--tokens"])
  assert status == 0
  images = json.loads((out / "images.json").read_text())["images"]
  assert len(images) == 3
  dets = json.loads((out / "detections.json").read_text())
  assert {d["image_id"] for d in dets} == {im["id"] for im in images}
  for im in images:
    with Image.open(out / "overlays" / f"{im['id']}.png") as png:
      assert png.size == (im["width"], im["height"])
    assert (out / "tokens" / f"{im['id']}.png").exists()
