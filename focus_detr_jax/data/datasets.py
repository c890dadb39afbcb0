"""The configured dataset: its TFDS builder, class metadata, raw examples per host, ground truth.

`config.data.dataset` picks the source: "coco" (TFDS coco/2017, `coco_tfds.py`), "coco_folder"
(a COCO-format folder, `coco_folder.py`) or "synthetic" (generated once, `synthetic.py`); all
three are read the same way (`read`), each host its own slice of a split (`host_split`).
"""

import dataclasses
import os
from typing import Optional

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from focus_detr_jax.data import canvas as canvas_lib
from focus_detr_jax.data import coco_folder
from focus_detr_jax.data import coco_tfds
from focus_detr_jax.data import synthetic

# Every function given to tf.data by the data modules only branches on Python (static) values;
# AutoGraph's source conversion is not needed and took most of the ~10 s it took to build a
# pipeline.
graph_fn = tf.autograph.experimental.do_not_convert


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """`config.data` read once (`from_config`): frozen and hashable; what every data module reads.
  The defaults and the meaning of each field live in `configs.common.get_data_config`."""
  dataset: str
  data_dir: Optional[str]
  tfds_name: str
  train_split: str
  eval_split: str
  folder: ml_collections.FrozenConfigDict
  synthetic: ml_collections.FrozenConfigDict
  group_bounds: Optional[tuple[float, ...]]
  scale_buckets: Optional[tuple[tuple[int, ...], ...]]
  canvases: tuple[tuple[int, int], ...]
  canvas_weights: Optional[tuple[float, ...]]
  schedule_sample_images: int
  eval_canvases: Optional[tuple[tuple[int, int], ...]]
  eval_exact: bool
  max_boxes: int
  batch_size: int
  eval_batch_size: int
  seed: int
  shuffle_buffer: int
  num_parallel_calls: int
  prefetch_batches: int
  augment: bool
  flip_prob: float
  crop_prob: float
  train_scales: tuple[int, ...]
  train_max_size: int
  crop_resize_scales: tuple[int, ...]
  crop_resize_max_size: int              # 0: unlimited (detectron2 default sys.maxsize)
  crop_size_range: tuple[int, int]
  eval_scale: int
  eval_max_size: int
  drop_crowd: bool
  skip_images_without_annotations: bool
  pixel_mean: tuple[float, float, float]
  pixel_std: tuple[float, float, float]

  @classmethod
  def from_config(cls, config) -> "DataConfig":
    """From a whole config or its `data` section; lists (a config read from JSON) become
    tuples, the `folder` and `synthetic` sections frozen."""
    data = config.data if "data" in config else config
    return cls(**{f.name: _frozen(data[f.name]) for f in dataclasses.fields(cls)})

  @property
  def eval_canvas_list(self) -> Optional[tuple]:
    """The canvases of evaluation (None: `eval_exact`, one shape per image)."""
    if self.eval_exact:
      return None
    return canvas_lib.normalize_canvases(self.eval_canvases or self.canvases)


def _frozen(value):
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, ml_collections.ConfigDict):
    return ml_collections.FrozenConfigDict(value)
  return value


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What the evaluation needs to know about the classes."""
  name: str
  category_ids: tuple[int, ...]     # original id of each contiguous label
  category_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)


def get_builder(data: DataConfig, prepare: bool = True):
  """(TFDS builder, DatasetMeta) of the configured dataset; folders are prepared if needed."""
  if data.dataset == "coco":
    builder = coco_tfds.coco_builder(data.data_dir, data.tfds_name)
    return builder, DatasetMeta(data.tfds_name, coco_tfds.COCO_CATEGORY_IDS,
                                coco_tfds.COCO_CATEGORY_NAMES)
  if data.dataset == "synthetic":
    s = data.synthetic
    ds = synthetic.ensure_synthetic_dataset(
        root=s.root or None, num_train=s.num_train, num_val=s.num_val,
        image_size=(int(s.image_size), int(s.image_width)) if s.get("image_width") else (
            int(s.image_size)),
        difficulty=s.difficulty, seed=s.seed)
    splits = {data.train_split: ds.splits["train"], data.eval_split: ds.splits["validation"]}
    builder = coco_folder.CocoFolder(splits=splits, name=ds.variant,
                                     data_dir=os.path.join(ds.root, "tfds"))
  elif data.dataset == "coco_folder":
    f = data.folder
    splits = {s: (i, a) for s, i, a in ((data.train_split, f.train_images, f.train_annotations),
                                        (data.eval_split, f.eval_images, f.eval_annotations))
              if i and a}
    if not splits:
      raise ValueError("dataset='coco_folder' needs config.data.folder.{train,eval}_images and "
                       "_annotations.")
    builder = coco_folder.CocoFolder(splits=splits, name=data.folder.name or None,
                                     verify=data.folder.verify, data_dir=data.data_dir)
  else:
    raise ValueError(f"Unknown dataset {data.dataset!r}: 'synthetic', 'coco' or 'coco_folder'.")
  if prepare and not _prepare(builder):
    return get_builder(data, prepare=False)   # another process prepared it first: read theirs
  return builder, DatasetMeta(builder.name + "/" + builder.builder_config.name,
                              tuple(builder.category_ids), tuple(builder.category_names))


def _prepare(builder) -> bool:
  """`builder.download_and_prepare()`; False when another process (the other hosts of a run, on
  a shared filesystem) renamed the same prepared directory into place first: TFDS writes to a
  temporary directory and renames it, which fails for the second. The directory is complete
  and holds the same data then, but this builder's info points at its own deleted copy."""
  try:
    builder.download_and_prepare()
  except FileExistsError:
    if not builder.is_prepared():
      raise
    return False
  return True


def dataset_meta(data: DataConfig) -> DatasetMeta:
  return get_builder(data)[1]


def label_to_category_id(data: DataConfig) -> np.ndarray:
  """int64 [C]: the original category id of each contiguous label (host side, for eval)."""
  return np.asarray(dataset_meta(data).category_ids, np.int64)


def read(builder, split, *, shuffle_files: bool, seed: int,
         header: bool = False) -> tf.data.Dataset:
  """Raw examples with the image still encoded; only the fields the pipeline uses.

  `header`: also `image/header` (hw, kind, channels of `canvas.tf_encoded_image_info`), read
  once here for the canvas routing and the format counters.
  """
  read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=True,
                                try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                          decoders={"image": tfds.decode.SkipDecoding()})

  def select(ex):
    out = {
        "image": ex["image"],
        "image/id": ex["image/id"],
        "objects": {k: ex["objects"][k] for k in ("bbox", "label", "is_crowd", "area")},
    }
    if header:
      hw, kind, channels = canvas_lib.tf_encoded_image_info(ex["image"])
      out["image/header"] = {"hw": hw, "kind": kind, "channels": channels}
    return out

  return ds.map(graph_fn(select))


def host_split(split: str, process_index: int, process_count: int):
  """This host's slice of `split` (`tfds.even_splits`)."""
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


def coco_ground_truth(data: DataConfig, split=None) -> dict:
  """COCO-format ground truth (original ids, absolute xywh boxes, crowd flags) of a split.

  Built from the TFDS data the pipeline reads (all hosts' images), for pycocotools.
  """
  builder, meta = get_builder(data)
  ds = read(builder, split or data.eval_split, shuffle_files=False, seed=0)
  ds = ds.map(graph_fn(
      lambda ex: {**ex, "hw": canvas_lib.tf_encoded_image_size(ex["image"])}))
  images, annotations = [], []
  for ex in ds.as_numpy_iterator():
    h, w = (int(v) for v in ex["hw"])
    if h <= 0 or w <= 0:
      continue  # unreadable: the pipeline skips it too
    iid = int(ex["image/id"])
    images.append({"id": iid, "height": h, "width": w})
    objs = ex["objects"]
    for bbox, label, crowd, area in zip(objs["bbox"], objs["label"], objs["is_crowd"],
                                        objs["area"]):
      y0, x0, y1, x1 = (float(v) for v in bbox)
      bw, bh = (x1 - x0) * w, (y1 - y0) * h
      annotations.append({"id": len(annotations) + 1, "image_id": iid,
                          "category_id": int(meta.category_ids[int(label)]),
                          "bbox": [x0 * w, y0 * h, bw, bh], "area": float(area),
                          "iscrowd": int(bool(crowd))})
  categories = [{"id": int(i), "name": n} for i, n in zip(meta.category_ids,
                                                            meta.category_names)]
  return {"images": images, "annotations": annotations, "categories": categories}
