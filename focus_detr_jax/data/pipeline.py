"""Input pipeline: TFDS (coco/2017, a COCO folder, or the synthetic set) -> static-shape batches.

    config = get_data_config("synthetic")          # or "coco"; merged as `config.data`
    it = make_train_iterator(config)               # infinite, checkpointable
    batch = next(it)                               # dict of numpy arrays, shapes below
    it.save(path); it2 = make_train_iterator(config); it2.restore(path)   # exact resume
    for batch in make_eval_iterator(config): ...   # every image once; `example_valid`

A batch (B = per-host batch, canvas (H, W) chosen per step (`canvas_for_step`), M = `max_boxes`):
  image          float32 [B, H, W, 3]  (x - mean) / std in RGB, then zero padding bottom/right
  padding_mask   bool    [B, H, W]     True = padded pixel
  image_size     int32   [B, 2]        (h, w) of the resized, unpadded image
  orig_size      int32   [B, 2]        (h, w) of the original image
  image_id       int64   [B]
  boxes          float32 [B, M, 4]     normalised cxcywh relative to image_size
  labels         int32   [B, M]        contiguous 0..C-1 (`label_to_category_id` maps back)
  box_valid      bool    [B, M]
  example_valid  bool    [B]           False for eval padding (always True in training)

How it works. Each host reads its own slice of the split (`tfds.even_splits`). Images stay
encoded until the (parallel) transform. Training (`buckets.py`): every example's random choices
are drawn from its header size first (`transforms.train_plan`), which gives its aspect group; each
group has its own stream, the schedule seeded by the step picks the group of each batch (each
group gets its data's share of the steps, so every image is drawn equally often) and, with scale
buckets, the multi-scale target and so the canvas: identical on all hosts. Per-example randomness
is stateless, keyed by (seed, host, position in the stream). The training iterator is
checkpointed with `tf.train.Checkpoint` (file order, shuffle buffer, positions, counters);
batches leave tf.data as uint8 and are normalised on the host or, in training, on the device
(`device.normalize_on_device`), which keeps the checkpoint, the buffers and the transfer small.

Bad input is skipped, clipped or truncated, and counted in `iterator.stats` (see STAT_KEYS):
unreadable images are dropped by `ignore_errors` and counted from the gaps they leave in the
stream positions.
"""

import dataclasses
import logging
import os
import sys

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from focus_detr_jax.data import buckets
from focus_detr_jax.data import canvas as canvas_lib
from focus_detr_jax.data import coco_folder
from focus_detr_jax.data import coco_tfds
from focus_detr_jax.data import synthetic
from focus_detr_jax.data import transforms

STAT_KEYS = ("images_seen", "images_unreadable", "images_used") + transforms.EXAMPLE_STATS
_SEEN, _UNREADABLE, _USED = 0, 1, 2

# Every function given to tf.data below only branches on Python (static) values; AutoGraph's
# source conversion is not needed and took most of the ~10 s it took to build a pipeline.
_graph_fn = tf.autograph.experimental.do_not_convert


# ----------------------------------------------------------------------------- configuration

# The COCO recipe's canvases: `buckets.choose_train_canvases(num_buckets=2, max_rescale=0.01,
# group_bounds=COCO_GROUP_BOUNDS)` and `buckets.choose_eval_canvases` on
# `buckets.COCO_LIKE_SIZE_MIX` (`scripts/benchmark_input.py --choose` recomputes them).
COCO_GROUP_BOUNDS = (0.72, 1.0, 1.4)
COCO_SCALE_BUCKETS = ((480, 512, 544, 576, 608, 640), (672, 704, 736, 768, 800))
COCO_TRAIN_CANVASES = ((640, 1297), (800, 1333), (640, 853), (800, 1067),
                       (853, 640), (1069, 800), (1138, 640), (1333, 800))
COCO_EVAL_CANVASES = ((800, 1067), (800, 1199), (750, 1333), (1067, 800), (1199, 800),
                      (1333, 750))

def get_data_config(preset: str = "coco") -> ml_collections.ConfigDict:
  """The `config.data` section. `preset`: "coco" (detrex recipe), "synthetic" (256x256 demo).

  Sizes: `train_scales`/`train_max_size` and the crop branch follow spec §9 for COCO; the
  synthetic preset scales them to a 256x256 canvas.
  """
  c = ml_collections.ConfigDict()
  c.dataset = "coco"                  # "synthetic" | "coco" | "coco_folder"
  # Optional fields are typed placeholders (None by default) so `--config.data.x=...` works.
  c.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir (local or gs://)
  c.tfds_name = coco_tfds.TFDS_NAME
  c.train_split = "train"
  c.eval_split = "validation"
  c.folder = ml_collections.ConfigDict()
  c.folder.train_images = ""          # directory of the training images
  c.folder.train_annotations = ""     # instances JSON of the training images
  c.folder.eval_images = ""
  c.folder.eval_annotations = ""
  c.folder.name = ""                  # readable part of the TFDS config name (optional)
  c.folder.verify = "full"            # "full": decode every image at preparation; "header"
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.difficulty = "easy"     # "easy" | "hard"
  c.synthetic.image_size = 256        # side of the square images (the height if image_width)
  c.synthetic.image_width = 0         # > 0: non-square images, image_size x image_width (H x W)
  c.synthetic.num_train = 1000
  c.synthetic.num_val = 200
  c.synthetic.seed = 0
  c.synthetic.root = ""               # "" -> $FOCUS_DETR_DATA_DIR/synthetic or ~/.cache/...
  # Static shapes.
  # Training canvases (docs/data.md §5): group-major, one per (aspect group, scale bucket);
  # for COCO 4 aspect groups (h/w < 0.72, < 1, < 1.4, >= 1.4) x 2 scale buckets = 8 shapes,
  # chosen by `buckets.choose_train_canvases` (BENCHMARKS.md, "Input pipeline").
  c.group_bounds = ml_collections.config_dict.placeholder(tuple)  # None: by the canvas count
  c.group_bounds = COCO_GROUP_BOUNDS  # h/w bounds of the aspect groups (ascending)
  c.scale_buckets = ml_collections.config_dict.placeholder(tuple)  # None: one, scale per image
  c.scale_buckets = COCO_SCALE_BUCKETS  # a partition of train_scales: the scale is per step
  c.canvases = COCO_TRAIN_CANVASES
  c.canvas_weights = ml_collections.config_dict.placeholder(tuple)  # per aspect group; None:
                                      # measured from the data (each image equally often)
  c.schedule_sample_images = 2000     # images whose header sizes measure those weights
  c.eval_canvases = ml_collections.config_dict.placeholder(tuple)  # None: same as `canvases`
  c.eval_canvases = COCO_EVAL_CANVASES
  c.eval_exact = False                # eval without canvases: batch 1, one shape per image
  c.max_boxes = 100
  c.batch_size = 16                   # global training batch (split evenly over hosts)
  c.eval_batch_size = 8               # global eval batch
  c.seed = 0
  c.shuffle_buffer = 1000             # encoded images (after file-level shuffling)
  c.num_parallel_calls = -1           # -1: tf.data AUTOTUNE
  c.prefetch_batches = 2
  # Augmentation (spec §9).
  c.augment = True
  c.flip_prob = 0.5
  c.crop_prob = 0.5
  c.train_scales = tuple(range(480, 801, 32))
  c.train_max_size = 1333
  c.crop_resize_scales = (400, 500, 600)
  c.crop_resize_max_size = 0          # 0: unlimited, as detectron2
  c.crop_size_range = (384, 600)
  c.eval_scale = 800
  c.eval_max_size = 1333
  c.drop_crowd = True
  c.skip_images_without_annotations = True
  c.pixel_mean = (123.675, 116.28, 103.53)
  c.pixel_std = (58.395, 57.12, 57.375)
  if preset == "synthetic":
    c.dataset = "synthetic"
    c.group_bounds = None
    c.scale_buckets = None
    c.canvases = ((256, 256),)
    c.eval_canvases = None
    c.train_scales = tuple(range(160, 257, 16))
    c.train_max_size = 256
    c.crop_resize_scales = (128, 160, 192)
    c.crop_size_range = (120, 192)
    c.eval_scale = 256
    c.eval_max_size = 256
    c.batch_size = 8
    c.shuffle_buffer = 256
  elif preset != "coco":
    raise ValueError(f"Unknown data preset {preset!r}; use 'coco' or 'synthetic'.")
  return c


def _data_section(config):
  return config.data if "data" in config else config


def _processes(process_index, process_count):
  if process_index is None or process_count is None:
    jax = sys.modules.get("jax")  # only if the caller already uses jax; never imported here
    index = jax.process_index() if jax is not None else 0
    count = jax.process_count() if jax is not None else 1
    process_index = index if process_index is None else process_index
    process_count = count if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  return int(process_index), int(process_count)


def _per_host(batch_size, process_count, what):
  if batch_size % process_count:
    raise ValueError(f"{what} {batch_size} is not divisible by process_count {process_count}.")
  return batch_size // process_count


# ----------------------------------------------------------------------------- datasets

@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """What the evaluation needs to know about the classes."""
  name: str
  category_ids: tuple[int, ...]     # original id of each contiguous label
  category_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)


def _folder_splits(data) -> dict:
  f = data.folder
  splits = {}
  if f.train_images and f.train_annotations:
    splits[data.train_split] = (f.train_images, f.train_annotations)
  if f.eval_images and f.eval_annotations:
    splits[data.eval_split] = (f.eval_images, f.eval_annotations)
  if not splits:
    raise ValueError("dataset='coco_folder' needs config.data.folder.{train,eval}_images and "
                     "_annotations.")
  return splits


def get_builder(config, prepare: bool = True):
  """(TFDS builder, DatasetMeta) of the configured dataset; folders are prepared if needed."""
  data = _data_section(config)
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
    builder = coco_folder.CocoFolder(splits=_folder_splits(data), name=data.folder.name or None,
                                     verify=data.folder.verify, data_dir=data.data_dir)
  else:
    raise ValueError(f"Unknown dataset {data.dataset!r}: 'synthetic', 'coco' or 'coco_folder'.")
  if prepare:
    builder.download_and_prepare()
  return builder, DatasetMeta(builder.name + "/" + builder.builder_config.name,
                              tuple(builder.category_ids), tuple(builder.category_names))


def dataset_meta(config) -> DatasetMeta:
  return get_builder(config)[1]


def label_to_category_id(config) -> np.ndarray:
  """int64 [C]: the original category id of each contiguous label (host side, for eval)."""
  return np.asarray(dataset_meta(config).category_ids, np.int64)


def _read(builder, split, *, shuffle_files: bool, seed: int,
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

  return ds.map(_graph_fn(select))


def _host_split(split: str, process_index: int, process_count: int):
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count)[process_index]


def _eval_filter(ds, b, canvases, data):
  if len(canvases) == 1:
    return ds
  return ds.filter(_graph_fn(lambda ex: tf.equal(transforms.tf_eval_canvas_index(
      ex["image/header"]["hw"], canvases, int(data.eval_scale), int(data.eval_max_size)), b)))


def _accumulate(state, el):
  """Running counters of one stream (tf.data scan; checkpointed with the iterator)."""
  last, totals = state
  step = el["index"] - last
  head = tf.stack([step, step - 1, tf.cast(el["keep"], tf.int64)])
  totals = totals + tf.concat([head, el["stats"]], axis=0)
  out = {k: v for k, v in el.items() if k != "index"}
  out["stats"] = totals
  return (el["index"], totals), out


def _options() -> tf.data.Options:
  o = tf.data.Options()
  o.deterministic = True
  # An injected prefetch (after the parallel map, before ignore_errors) made the process hang
  # at interpreter exit with live iterators (TF 2.21); our own prefetch is at the end.
  o.experimental_optimization.inject_prefetch = False
  return o


def _npc(data):
  return tf.data.AUTOTUNE if data.num_parallel_calls in (None, -1) else int(
      data.num_parallel_calls)


def _stream_key(seed, process_index, bucket, index):
  high = tf.constant(((process_index * 64 + bucket) << 40), tf.int64)
  return tf.stack([tf.constant(seed, tf.int64), high + index])


# ----------------------------------------------------------------------------- training

_SCHEDULES = {}


def _group_bounds(data, num_canvases: int):
  if data.get("group_bounds") is not None:
    return tuple(float(b) for b in data.group_bounds)
  num_buckets = len(data.scale_buckets) if data.get("scale_buckets") else 1
  groups = num_canvases // num_buckets
  if groups not in (1, 2):
    raise ValueError(f"{num_canvases} canvases and {num_buckets} scale buckets: set "
                     "data.group_bounds (the h/w bounds of the aspect groups) for more than two "
                     "groups.")
  return () if groups == 1 else (1.0,)    # one group, or landscape / the others (detrex's)


def measured_group_weights(config, group_bounds) -> tuple[float, ...]:
  """Share of each aspect group among augmented training images, measured on the header sizes
  of the first `schedule_sample_images` images of the whole split (the same on every host)."""
  data = _data_section(config)
  if not group_bounds:
    return (1.0,)
  builder, _ = get_builder(config)
  ds = _read(builder, data.train_split, shuffle_files=False, seed=0, header=True)
  ds = ds.take(int(data.schedule_sample_images)).map(
      _graph_fn(lambda ex: ex["image/header"]["hw"]), num_parallel_calls=tf.data.AUTOTUNE)
  hw = np.asarray([v for v in ds.as_numpy_iterator() if v.min() > 0], np.int64).reshape(-1, 2)
  if not len(hw):
    raise RuntimeError("The training split has no readable image header: no input to train on.")
  return tuple(float(v) for v in buckets.group_shares(hw, data, group_bounds, int(data.seed)))


def train_schedule(config) -> buckets.Schedule:
  """The training-step schedule of `config` (`buckets.Schedule`): canvases, aspect groups and
  their weights (`canvas_weights`, or measured from the data: each image equally often)."""
  data = _data_section(config)
  key = data.to_json_best_effort(sort_keys=True)
  if key not in _SCHEDULES:
    canvases = canvas_lib.normalize_canvases(data.canvases)
    if len(canvases) == 1:        # one shape (e.g. --config.data.canvases='((512, 512),)')
      bounds, scale_buckets = (), None
    else:
      bounds, scale_buckets = _group_bounds(data, len(canvases)), data.get("scale_buckets")
    weights = data.canvas_weights
    if weights is None and bounds:
      weights = measured_group_weights(config, bounds)
      logging.info("aspect-group weights measured on the data: %s", weights)
    try:
      _SCHEDULES[key] = buckets.make_schedule(canvases, data.train_scales, scale_buckets,
                                              bounds, weights, int(data.seed))
    except ValueError as e:
      raise ValueError(f"{e} (data.canvases holds one (H, W) per aspect group (data."
                       "group_bounds) and scale bucket (data.scale_buckets), group-major; "
                       "a single canvas needs neither)") from None
  return _SCHEDULES[key]


def _train_group(builder, split, g, schedule, data, cfg, batch, process_index):
  """The batches of aspect group `g` on this host.

  Every group reads the same file order and numbers its positions p the same way, draws each
  example's random choices from (seed, host, p) and its header size (`transforms.train_plan`),
  and keeps the positions whose augmented image falls into group g: each position of an epoch
  is used by exactly one group. Then shuffle, decode + flip + crop (stage 1), skip unusable
  images (counted), and the final resize into the canvas of the step's scale (stage 2).
  """
  raw = _read(builder, split, shuffle_files=True, seed=int(data.seed), header=True).repeat()
  bounds = schedule.group_bounds

  def plan(p, ex):
    key = _stream_key(data.seed, process_index, 0, p)
    return {**ex, "plan": transforms.train_plan(ex["image/header"]["hw"], key, cfg, bounds)}

  ds = raw.enumerate().map(_graph_fn(plan), num_parallel_calls=_npc(data), deterministic=True)
  if schedule.num_groups > 1:
    ds = ds.filter(_graph_fn(lambda ex: tf.equal(ex["plan"]["group"], g)))
  # Each group's buffer holds its share of `shuffle_buffer`: together one buffer's memory, and a
  # rare group does not read (and reject) buffer / share examples before its first batch.
  share = schedule.group_counts[g] / max(sum(schedule.group_counts), 1)
  buffer = max(2, int(round(int(data.shuffle_buffer or 0) * share)))
  if data.shuffle_buffer and data.shuffle_buffer > 1:
    ds = ds.shuffle(buffer, seed=int(data.seed) + 1, reshuffle_each_iteration=True)
  ds = ds.enumerate()

  def augment(i, ex):
    out = transforms.train_augment(ex, ex["plan"], cfg)
    return {**out, "index": i}

  ds = ds.map(_graph_fn(augment), num_parallel_calls=_npc(data), deterministic=True)
  ds = ds.ignore_errors(log_warning=True)
  ds = ds.scan((tf.constant(-1, tf.int64), tf.zeros([len(STAT_KEYS)], tf.int64)),
                _graph_fn(_accumulate))
  ds = ds.filter(_graph_fn(lambda el: el["keep"]))
  ds = ds.enumerate()

  def finish(j, el):
    if schedule.scale_per_step:
      short = buckets.tf_scale_for(g, j // batch, schedule)
      canvas = buckets.tf_canvas_for(g, short, schedule)
    else:
      short, canvas = el["short"], schedule.canvases[schedule.canvas_index(g, 0)]
    out = transforms.train_finish(el, short, canvas, cfg)
    after = out.pop("stats")
    return {**out, "stats": el["stats"], "stats_after": after, "bucket": tf.constant(g, tf.int32)}

  ds = ds.map(_graph_fn(finish), num_parallel_calls=_npc(data), deterministic=True)
  return ds.batch(batch, drop_remainder=True)


def make_train_dataset(config, process_index=None, process_count=None) -> tf.data.Dataset:
  """The tf.data training stream (uint8 images, counters); use `make_train_iterator`."""
  data = _data_section(config)
  process_index, process_count = _processes(process_index, process_count)
  batch = _per_host(int(data.batch_size), process_count, "batch_size")
  builder, _ = get_builder(config)
  schedule = train_schedule(config)
  cfg = transforms.TransformConfig.from_config(data)
  split = _host_split(data.train_split, process_index, process_count)
  groups = [_train_group(builder, split, g, schedule, data, cfg, batch, process_index)
            for g in range(schedule.num_groups)]
  if len(groups) == 1:
    ds = groups[0]
  else:
    ds = tf.data.Dataset.choose_from_datasets(groups, buckets.group_schedule_dataset(schedule))
  ds = ds.prefetch(int(data.prefetch_batches))
  return ds.with_options(_options())


def canvas_for_step(config, step: int) -> tuple[int, int]:
  """(H, W) of the training batch at `step` (the same on every host)."""
  return buckets.plan_for_step(step, train_schedule(config)).canvas


def train_shapes(config) -> tuple[tuple[int, int], ...]:
  """The distinct training canvases (one compile each)."""
  return tuple(dict.fromkeys(train_schedule(config).canvases))


# ----------------------------------------------------------------------------- evaluation

def _eval_bucket_counts(builder, split, canvases, process_count, data) -> np.ndarray:
  """int [P, n_canvases]: images per host and canvas (one header pass over the split)."""
  counts = np.zeros((process_count, len(canvases)), np.int64)
  for p in range(process_count):
    ds = _read(builder, _host_split(split, p, process_count), shuffle_files=False, seed=0)
    ds = ds.map(_graph_fn(lambda ex: transforms.tf_eval_canvas_index(
        canvas_lib.tf_encoded_image_size(ex["image"]), canvases, int(data.eval_scale),
        int(data.eval_max_size))),
                num_parallel_calls=tf.data.AUTOTUNE)
    for b in ds.as_numpy_iterator():
      counts[p, int(b)] += 1
  return counts


def _padding_element(spec) -> dict:
  def zeros(s):
    return tf.zeros([1 if d is None else d for d in s.shape], s.dtype)
  return tf.nest.map_structure(zeros, spec)


def make_eval_dataset(config, process_index=None, process_count=None, split=None):
  """(tf.data eval stream, expected number of images on this host or None)."""
  data = _data_section(config)
  process_index, process_count = _processes(process_index, process_count)
  split = split or data.eval_split
  builder, _ = get_builder(config)
  cfg = transforms.TransformConfig.from_config(data)
  exact = bool(data.eval_exact)
  if exact:
    canvases, batch = (None,), 1
  else:
    canvases = canvas_lib.normalize_canvases(data.eval_canvases or data.canvases)
    batch = _per_host(int(data.eval_batch_size), process_count, "eval_batch_size")
  host_split = _host_split(split, process_index, process_count)
  try:
    expected = int(builder.info.splits[host_split].num_examples)
  except Exception:  # pylint: disable=broad-except  # unknown split sizes (e.g. mocked TFDS)
    expected = None
  counts = None
  if process_count > 1:
    if len(canvases) > 1:
      counts = _eval_bucket_counts(builder, split, canvases, process_count, data)
    else:
      sizes = [int(builder.info.splits[_host_split(split, p, process_count)].num_examples)
               for p in range(process_count)]
      counts = np.asarray(sizes, np.int64)[:, None]
  raw = _read(builder, host_split, shuffle_files=False, seed=0, header=True)
  streams = []
  for b, canvas in enumerate(canvases):
    ds = raw if exact else _eval_filter(raw, b, canvases, data)
    ds = ds.enumerate()

    def fn(i, ex, b=b, canvas=canvas):
      out = transforms.eval_example(ex, canvas, cfg)
      return {**out, "index": i, "bucket": tf.constant(b, tf.int32)}

    ds = ds.map(_graph_fn(fn), num_parallel_calls=_npc(data), deterministic=True)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.scan((tf.constant(-1, tf.int64), tf.zeros([len(STAT_KEYS)], tf.int64)),
                 _graph_fn(_accumulate))
    pad = tf.data.Dataset.from_tensors(_padding_element(ds.element_spec)).repeat()
    if counts is not None:
      num_batches = int(-(-counts[:, b].max() // batch))
      ds = ds.concatenate(pad).take(num_batches * batch)
    else:
      ds = ds.concatenate(pad.take(batch - 1))
    streams.append(ds.batch(batch, drop_remainder=True))
  ds = streams[0]
  for s in streams[1:]:
    ds = ds.concatenate(s)
  ds = ds.prefetch(int(data.prefetch_batches))
  return ds.with_options(_options()), expected


# ----------------------------------------------------------------------------- host side

def normalize_batch(u8: np.ndarray, image_size: np.ndarray, mean, std):
  """uint8 [B, H, W, 3] canvases -> (float32 (x - mean) / std, zero outside the image; mask).

  Only the image region of each canvas is computed (float32 subtract then divide: exactly the
  detectron2 formula); `mask` bool [B, H, W] is True on padded pixels.
  """
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
  mask = ((np.arange(h)[None, :, None] >= image_size[:, 0, None, None]) |
          (np.arange(w)[None, None, :] >= image_size[:, 1, None, None]))
  return image, mask


class DataIterator:
  """Iterator of host batches (numpy) over a tf.data stream; checkpointable.

  `stats`: cumulative counters (STAT_KEYS) over all canvases of this host.
  `save(prefix)` / `restore(path)`: the exact stream position (tf.train.Checkpoint files
  `prefix.index`, `prefix.data-*`); restore into an iterator built from the same config.
  `normalize_on_host=False`: batches keep the uint8 `image` and carry no `padding_mask`
  (`device_normalize` makes both on the accelerator: 4x fewer bytes over the wire).
  """

  normalize_on_host = True

  def __init__(self, dataset: tf.data.Dataset, data, meta: DatasetMeta, num_buckets: int, *,
               training: bool, expected_examples=None):
    self._dataset = dataset
    self._iterator = iter(dataset)
    self._training = training
    self._expected = expected_examples
    self._totals = np.zeros((num_buckets, len(STAT_KEYS)), np.int64)
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
    keep = el.pop("keep")
    return self._finalize(el, keep)

  def _finalize(self, el, keep) -> dict:
    if self.normalize_on_host:
      image, mask = normalize_batch(el.pop("image"), el["image_size"], self._mean, self._std)
      images = {"image": image, "padding_mask": mask}
    else:
      images = {"image": el.pop("image")}
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
    totals = {k: int(v) for k, v in zip(STAT_KEYS, self._totals.sum(axis=0))}
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


def make_train_iterator(config, process_index=None, process_count=None,
                        normalize_on_host=True) -> DataIterator:
  """Infinite, checkpointable iterator of training batches for this host.

  `normalize_on_host=False`: uint8 images, normalised inside the step (see DataIterator)."""
  data = _data_section(config)
  ds = make_train_dataset(config, process_index, process_count)
  _, meta = get_builder(config, prepare=False)
  iterator = DataIterator(ds, data, meta, train_schedule(config).num_groups, training=True)
  iterator.normalize_on_host = normalize_on_host
  return iterator


def make_eval_iterator(config, process_index=None, process_count=None,
                       split=None) -> DataIterator:
  """Every image of the host's share of the eval split exactly once, canvas by canvas.

  The last batch of each canvas is padded with `example_valid=False`; on several hosts each
  canvas gets the same number of batches everywhere.
  """
  data = _data_section(config)
  ds, expected = make_eval_dataset(config, process_index, process_count, split)
  _, meta = get_builder(config, prepare=False)
  n = 1 if data.eval_exact else len(canvas_lib.normalize_canvases(
      data.eval_canvases or data.canvases))
  return DataIterator(ds, data, meta, n, training=False, expected_examples=expected)


def format_stats(stats) -> str:
  return coco_folder.format_stats(stats)


def log_stats(it: DataIterator, prefix: str = "input") -> None:
  logging.info("%s: %s", prefix, format_stats(it.stats))


# ----------------------------------------------------------------------------- utilities

def estimate_canvas_weights(config) -> tuple[float, ...]:
  """Share of each aspect group among augmented training images (what `canvas_weights=None`
  uses; see `measured_group_weights`)."""
  data = _data_section(config)
  canvases = canvas_lib.normalize_canvases(data.canvases)
  return measured_group_weights(config, _group_bounds(data, len(canvases)))


def coco_ground_truth(config, split=None) -> dict:
  """COCO-format ground truth (original ids, absolute xywh boxes, crowd flags) of a split.

  Built from the TFDS data the pipeline reads (all hosts' images), for pycocotools.
  """
  data = _data_section(config)
  builder, meta = get_builder(config)
  ds = _read(builder, split or data.eval_split, shuffle_files=False, seed=0)
  ds = ds.map(_graph_fn(
      lambda ex: {**ex, "hw": canvas_lib.tf_encoded_image_size(ex["image"])}))
  images, annotations = [], []
  ann_id = 1
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
      annotations.append({"id": ann_id, "image_id": iid,
                          "category_id": int(meta.category_ids[int(label)]),
                          "bbox": [x0 * w, y0 * h, bw, bh], "area": float(area),
                          "iscrowd": int(bool(crowd))})
      ann_id += 1
  categories = [{"id": int(i), "name": n} for i, n in zip(meta.category_ids,
                                                            meta.category_names)]
  return {"images": images, "annotations": annotations, "categories": categories}
