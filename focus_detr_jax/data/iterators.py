"""Host batches: a checkpointable iterator over the tf.data streams of `streams.py`.

    config = configs.common.get_base_config()      # `config.data`: configs.common.get_data_config
    data = datasets.DataConfig.from_config(config) # read once, at the script boundary
    it = make_train_iterator(data)                 # infinite, checkpointable
    batch = next(it)                               # dict of numpy arrays, shapes below
    it.save(path); it2 = make_train_iterator(data); it2.restore(path)     # exact resume
    for batch in make_eval_iterator(data): ...     # every image once; `example_valid`

A batch (B = per-host batch, canvas (H, W) chosen per step (`buckets.py`), M = `max_boxes`):
  image          float32 [B, H, W, 3]  (x - mean) / std in RGB, then zero padding bottom/right
  pixel_valid    bool    [B, H, W]     True = image pixel, False = padding
  image_size     int32   [B, 2]        (h, w) of the resized, unpadded image
  orig_size      int32   [B, 2]        (h, w) of the original image
  image_id       int64   [B]
  boxes          float32 [B, M, 4]     normalised cxcywh relative to image_size
  labels         int32   [B, M]        contiguous 0..C-1 (`datasets.label_to_category_id`)
  box_valid      bool    [B, M]
  example_valid  bool    [B]           False for eval padding (always True in training)

The training iterator is checkpointed with `tf.train.Checkpoint` (file order, shuffle buffer,
positions, counters); batches leave tf.data as uint8 and are normalised on the host or, in
training, on the device (`device.normalize_on_device`), which keeps the checkpoint, the buffers
and the transfer small. Bad input is counted in `iterator.stats` (`streams.STAT_KEYS`).
"""

import logging

import numpy as np
import tensorflow as tf

from focus_detr_jax.data import coco_folder
from focus_detr_jax.data import datasets
from focus_detr_jax.data import streams
from focus_detr_jax.data import transforms


def normalize_batch(u8: np.ndarray, image_size: np.ndarray, mean, std):
  """uint8 [B, H, W, 3] canvases -> (float32 (x - mean) / std, zero outside the image;
  pixel_valid bool [B, H, W], True on image pixels). float32 subtract then divide: exactly the
  detectron2 formula."""
  b, h, w, _ = u8.shape
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  image = np.zeros(u8.shape, np.float32)
  for i in range(b):
    ih, iw = (int(v) for v in image_size[i])
    # Rows as [iw * 3] vectors: long inner loops (a 3-long innermost axis is ~8x slower).
    region = image[i, :ih, :iw].reshape(ih, iw * 3)
    np.subtract(u8[i, :ih, :iw].reshape(ih, iw * 3), np.tile(mean, iw), out=region,
                dtype=np.float32)
    np.divide(region, np.tile(std, iw), out=region)
  pixel_valid = ((np.arange(h)[None, :, None] < image_size[:, 0, None, None]) &
                 (np.arange(w)[None, None, :] < image_size[:, 1, None, None]))
  return image, pixel_valid


class DataIterator:
  """Iterator of host batches (numpy) over a tf.data stream; checkpointable.

  `stats`: cumulative counters (streams.STAT_KEYS) over all canvases of this host.
  `save(prefix)` / `restore(path)`: the exact stream position (tf.train.Checkpoint files
  `prefix.index`, `prefix.data-*`); restore into an iterator built from the same config.
  `normalize_on_host=False`: batches keep the uint8 `image` and carry no `pixel_valid`
  (`device.normalize_on_device` makes both on the accelerator: 4x fewer bytes over the wire).
  """

  def __init__(self, dataset: tf.data.Dataset, data, meta: datasets.DatasetMeta,
               num_buckets: int, *, training: bool, expected_examples=None,
               normalize_on_host: bool = True):
    self.normalize_on_host = normalize_on_host
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._training = training
    self._expected = expected_examples
    self._totals = np.zeros((num_buckets, len(streams.STAT_KEYS)), np.int64)
    self._totals_var = tf.Variable(self._totals, dtype=tf.int64, trainable=False)
    # Counters of the final resize (training's stage 2), summed per batch.
    self._after = np.zeros([len(transforms.EXAMPLE_STATS)], np.int64)
    self._after_var = tf.Variable(self._after, dtype=tf.int64, trainable=False)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator, stats=self._totals_var,
                                           stats_after=self._after_var)
    self._exhausted = False
    self.meta = meta
    self._mean = np.asarray(data.pixel_mean, np.float32)
    self._std = np.asarray(data.pixel_std, np.float32)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    try:
      el = next(self._iterator)
    except StopIteration:
      self._exhausted = True
      if self._training:
        raise RuntimeError(
            "The training input ended: an aspect group the schedule uses has no usable image "
            f"in this host's shard (stats: {self.stats}). Check the data and "
            "`canvas_weights` (None measures them from the data).") from None
      raise
    el = {k: v.numpy() for k, v in el.items()}
    bucket = int(el.pop("bucket")[0])
    stats = el.pop("stats")
    self._totals[bucket] = np.maximum(self._totals[bucket], stats.max(axis=0))
    if "stats_after" in el:
      self._after += el.pop("stats_after").sum(axis=0)
    return self._finalize(el, el.pop("keep"))

  def _finalize(self, el, keep) -> dict:
    images = {"image": el.pop("image")}
    if self.normalize_on_host:
      images["image"], images["pixel_valid"] = normalize_batch(images["image"], el["image_size"],
                                                               self._mean, self._std)
    return {
        **images,
        "image_size": el["image_size"].astype(np.int32),
        "orig_size": el["orig_size"].astype(np.int32),
        "image_id": el["image_id"].astype(np.int64),
        "boxes": el["boxes"].astype(np.float32),
        "labels": el["labels"].astype(np.int32),
        "box_valid": el["box_valid"].astype(bool),
        "example_valid": keep.astype(bool) if not self._training else np.ones([len(keep)], bool),
    }

  @property
  def stats(self) -> dict:
    totals = {k: int(v) for k, v in zip(streams.STAT_KEYS, self._totals.sum(axis=0))}
    for k, v in zip(transforms.EXAMPLE_STATS, self._after):
      totals[k] += int(v)
    if self._exhausted and self._expected is not None:
      # Images dropped at the very end of a stream leave no gap: count them from the total.
      totals["images_unreadable"] = self._expected - totals["images_used"]
      totals["images_seen"] = self._expected
    return totals

  def save(self, prefix: str) -> str:
    """Writes the position (and counters); returns the checkpoint path to `restore`."""
    self._totals_var.assign(self._totals)
    self._after_var.assign(self._after)
    return self._checkpoint.write(prefix)

  def restore(self, path: str) -> None:
    self._checkpoint.read(path).assert_consumed()
    self._totals = self._totals_var.numpy().copy()
    self._after = self._after_var.numpy().copy()


def make_train_iterator(data: datasets.DataConfig, process_index=None, process_count=None,
                        normalize_on_host=True) -> DataIterator:
  """Infinite, checkpointable iterator of training batches for this host (`normalize_on_host`:
  see DataIterator)."""
  ds, meta, num_groups = streams.make_train_dataset(data, process_index, process_count)
  return DataIterator(ds, data, meta, num_groups, training=True,
                      normalize_on_host=normalize_on_host)


def make_eval_iterator(data: datasets.DataConfig, process_index=None, process_count=None,
                       split=None) -> DataIterator:
  """Every image of the host's share of the eval split exactly once, canvas by canvas.

  The last batch of each canvas is padded with `example_valid=False`; on several hosts each
  canvas gets the same number of batches everywhere.
  """
  ds, meta, num_canvases, expected = streams.make_eval_dataset(data, process_index,
                                                              process_count, split)
  return DataIterator(ds, data, meta, num_canvases, training=False, expected_examples=expected)


def log_stats(it: DataIterator, prefix: str = "input") -> None:
  logging.info("%s: %s", prefix, coco_folder.format_stats(it.stats))
