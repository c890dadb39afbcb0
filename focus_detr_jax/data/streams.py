"""The tf.data streams: training (per aspect group, on the step schedule) and evaluation.

Each host reads its own slice of the split (`datasets.host_split`). Images stay encoded until
the (parallel) transform. Training (`buckets.py`): every example's random choices are drawn from
its header size first (`transforms.train_plan`), which gives its aspect group; each group has its
own stream, the schedule seeded by the step picks the group of each batch (each group gets its
data's share of the steps, so every image is drawn equally often) and, with scale buckets, the
multi-scale target and so the canvas: identical on all hosts. Per-example randomness is
stateless, keyed by (seed, host, position in the stream). Evaluation: every image once, canvas by
canvas, the last batch of each canvas padded. Elements leave as uint8 with running counters
(STAT_KEYS); `iterators.py` turns them into host batches.

Bad input is skipped, clipped or truncated, and counted (STAT_KEYS): unreadable images are
dropped by `ignore_errors` and counted from the gaps they leave in the stream positions.
"""

import functools
import logging
import sys

import numpy as np
import tensorflow as tf

from focus_detr_jax.data import buckets
from focus_detr_jax.data import canvas as canvas_lib
from focus_detr_jax.data import datasets
from focus_detr_jax.data import transforms

STAT_KEYS = ("images_seen", "images_unreadable", "images_used") + transforms.EXAMPLE_STATS


def _processes(process_index, process_count):
  jax = sys.modules.get("jax")  # only if the caller already uses jax; never imported here
  if process_index is None:
    process_index = jax.process_index() if jax is not None else 0
  if process_count is None:
    process_count = jax.process_count() if jax is not None else 1
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  return int(process_index), int(process_count)


def _per_host(batch_size, process_count, what):
  if batch_size % process_count:
    raise ValueError(f"{what} {batch_size} is not divisible by process_count {process_count}.")
  return batch_size // process_count


def _counted_map(ds, fn, data):
  """`fn` over the stream's examples in parallel (deterministic), unreadable ones dropped
  (`ignore_errors`) and the running counters added (`_accumulate`: a dropped example leaves a
  gap in the stream positions)."""
  ds = ds.enumerate().map(datasets.graph_fn(lambda i, ex: {**fn(ex), "index": i}),
                          num_parallel_calls=_npc(data), deterministic=True)
  return ds.ignore_errors(log_warning=True).scan(
      (tf.constant(-1, tf.int64), tf.zeros([len(STAT_KEYS)], tf.int64)),
      datasets.graph_fn(_accumulate))


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


# ----------------------------------------------------------------------------- training

_SCHEDULES = {}


def _group_bounds(data, num_canvases: int):
  if data.group_bounds is not None:
    return tuple(float(b) for b in data.group_bounds)
  num_buckets = len(data.scale_buckets) if data.scale_buckets else 1
  groups = num_canvases // num_buckets
  if groups not in (1, 2):
    raise ValueError(f"{num_canvases} canvases and {num_buckets} scale buckets: set "
                     "data.group_bounds (the h/w bounds of the aspect groups) for more than two "
                     "groups.")
  return () if groups == 1 else (1.0,)    # one group, or landscape / the others (detrex's)


def measured_group_weights(data: datasets.DataConfig, group_bounds) -> tuple[float, ...]:
  """Share of each aspect group among augmented training images, measured on the header sizes
  of the first `schedule_sample_images` images of the whole split (the same on every host)."""
  if not group_bounds:
    return (1.0,)
  builder, _ = datasets.get_builder(data)
  ds = datasets.read(builder, data.train_split, shuffle_files=False, seed=0, header=True)
  ds = ds.take(int(data.schedule_sample_images)).map(
      datasets.graph_fn(lambda ex: ex["image/header"]["hw"]),
      num_parallel_calls=tf.data.AUTOTUNE)
  hw = np.asarray([v for v in ds.as_numpy_iterator() if v.min() > 0], np.int64).reshape(-1, 2)
  if not len(hw):
    raise RuntimeError("The training split has no readable image header: no input to train on.")
  return tuple(float(v) for v in buckets.group_shares(hw, data, group_bounds, int(data.seed)))


def train_schedule(data: datasets.DataConfig) -> buckets.Schedule:
  """The training-step schedule (`buckets.Schedule`): canvases, aspect groups and their
  weights (`canvas_weights`, or measured from the data: each image equally often)."""
  if data not in _SCHEDULES:
    canvases = canvas_lib.normalize_canvases(data.canvases)
    if len(canvases) == 1:        # one shape (e.g. --config.data.canvases='((512, 512),)')
      bounds, scale_buckets = (), None
    else:
      bounds, scale_buckets = _group_bounds(data, len(canvases)), data.scale_buckets
    weights = data.canvas_weights
    if weights is None and bounds:
      weights = measured_group_weights(data, bounds)
      logging.info("aspect-group weights measured on the data: %s", weights)
    try:
      _SCHEDULES[data] = buckets.make_schedule(canvases, data.train_scales, scale_buckets,
                                              bounds, weights, int(data.seed))
    except ValueError as e:
      raise ValueError(f"{e} (data.canvases holds one (H, W) per aspect group (data."
                       "group_bounds) and scale bucket (data.scale_buckets), group-major; "
                       "a single canvas needs neither)") from None
  return _SCHEDULES[data]


def _train_group(builder, split, g, schedule, data, batch, process_index):
  """The batches of aspect group `g` on this host.

  Every group reads the same file order and numbers its positions p the same way, draws each
  example's random choices from (seed, host, p) and its header size (`transforms.train_plan`),
  and keeps the positions whose augmented image falls into group g: each position of an epoch
  is used by exactly one group. Then shuffle, decode + flip + crop (stage 1), skip unusable
  images (counted), and the final resize into the canvas of the step's scale (stage 2).
  """
  raw = datasets.read(builder, split, shuffle_files=True, seed=int(data.seed),
                      header=True).repeat()
  bounds = schedule.group_bounds

  def plan(p, ex):
    key = tf.stack([tf.constant(data.seed, tf.int64),
                    tf.constant((process_index * 64) << 40, tf.int64) + p])
    return {**ex, "plan": transforms.train_plan(ex["image/header"]["hw"], key, data, bounds)}

  ds = raw.enumerate().map(datasets.graph_fn(plan), num_parallel_calls=_npc(data),
                           deterministic=True)
  if schedule.num_groups > 1:
    ds = ds.filter(datasets.graph_fn(lambda ex: tf.equal(ex["plan"]["group"], g)))
  # Each group's buffer holds its share of `shuffle_buffer`: together one buffer's memory, and a
  # rare group does not read (and reject) buffer / share examples before its first batch.
  share = schedule.group_counts[g] / max(sum(schedule.group_counts), 1)
  buffer = max(2, int(round(int(data.shuffle_buffer or 0) * share)))
  if data.shuffle_buffer and data.shuffle_buffer > 1:
    ds = ds.shuffle(buffer, seed=int(data.seed) + 1, reshuffle_each_iteration=True)
  ds = _counted_map(ds, lambda ex: transforms.train_augment(ex, ex["plan"], data), data)
  ds = ds.filter(datasets.graph_fn(lambda el: el["keep"]))
  ds = ds.enumerate()

  def finish(j, el):
    if schedule.scale_per_step:
      short = buckets.tf_scale_for(g, j // batch, schedule)
      canvas = buckets.tf_canvas_for(g, short, schedule)
    else:
      short, canvas = el["short"], schedule.canvases[schedule.canvas_index(g, 0)]
    out = transforms.train_finish(el, short, canvas, data)
    after = out.pop("stats")
    return {**out, "stats": el["stats"], "stats_after": after, "bucket": tf.constant(g, tf.int32)}

  ds = ds.map(datasets.graph_fn(finish), num_parallel_calls=_npc(data), deterministic=True)
  return ds.batch(batch, drop_remainder=True)


def make_train_dataset(data: datasets.DataConfig, process_index=None, process_count=None):
  """(tf.data training stream (uint8 images, counters), DatasetMeta, number of aspect groups);
  use `make_train_iterator`."""
  process_index, process_count = _processes(process_index, process_count)
  batch = _per_host(int(data.batch_size), process_count, "batch_size")
  builder, meta = datasets.get_builder(data)
  schedule = train_schedule(data)
  split = datasets.host_split(data.train_split, process_index, process_count)
  groups = [_train_group(builder, split, g, schedule, data, batch, process_index)
            for g in range(schedule.num_groups)]
  ds = groups[0] if len(groups) == 1 else tf.data.Dataset.choose_from_datasets(
      groups, buckets.group_schedule_dataset(schedule))
  ds = ds.prefetch(int(data.prefetch_batches))
  return ds.with_options(_options()), meta, schedule.num_groups


def train_shapes(data: datasets.DataConfig) -> tuple[tuple[int, int], ...]:
  """The distinct training canvases (one compile each)."""
  return tuple(dict.fromkeys(train_schedule(data).canvases))


# ----------------------------------------------------------------------------- evaluation

def _eval_bucket_counts(builder, split, canvases, process_count, data) -> np.ndarray:
  """int [P, n_canvases]: images per host and canvas (one header pass over the split)."""
  counts = np.zeros((process_count, len(canvases)), np.int64)
  for p in range(process_count):
    ds = datasets.read(builder, datasets.host_split(split, p, process_count), shuffle_files=False,
                       seed=0)
    ds = ds.map(datasets.graph_fn(lambda ex: transforms.tf_eval_canvas_index(
        canvas_lib.tf_encoded_image_size(ex["image"]), canvases, int(data.eval_scale),
        int(data.eval_max_size))),
                num_parallel_calls=tf.data.AUTOTUNE)
    for b in ds.as_numpy_iterator():
      counts[p, int(b)] += 1
  return counts


def make_eval_dataset(data: datasets.DataConfig, process_index=None, process_count=None,
                      split=None):
  """(tf.data eval stream, DatasetMeta, number of canvases, expected number of images on this
  host or None)."""
  process_index, process_count = _processes(process_index, process_count)
  split = split or data.eval_split
  builder, meta = datasets.get_builder(data)
  canvases = data.eval_canvas_list
  if canvases is None:   # eval_exact: one shape per image
    canvases, batch = (None,), 1
  else:
    batch = _per_host(int(data.eval_batch_size), process_count, "eval_batch_size")
  own_split = datasets.host_split(split, process_index, process_count)
  try:
    expected = int(builder.info.splits[own_split].num_examples)
  except Exception:  # pylint: disable=broad-except  # unknown split sizes (e.g. mocked TFDS)
    expected = None
  counts = None
  if process_count > 1:
    if len(canvases) > 1:
      counts = _eval_bucket_counts(builder, split, canvases, process_count, data)
    else:
      sizes = [int(builder.info.splits[datasets.host_split(split, p, process_count)].num_examples)
               for p in range(process_count)]
      counts = np.asarray(sizes, np.int64)[:, None]
  raw = datasets.read(builder, own_split, shuffle_files=False, seed=0, header=True)
  per_canvas = []
  for b, canvas in enumerate(canvases):
    ds = raw
    if len(canvases) > 1:
      ds = raw.filter(datasets.graph_fn(lambda ex, b=b: tf.equal(transforms.tf_eval_canvas_index(
          ex["image/header"]["hw"], canvases, int(data.eval_scale), int(data.eval_max_size)), b)))
    ds = _counted_map(ds, lambda ex, b=b, canvas=canvas: {
        **transforms.eval_example(ex, canvas, data), "bucket": tf.constant(b, tf.int32)}, data)
    pad = tf.data.Dataset.from_tensors(tf.nest.map_structure(
        lambda s: tf.zeros([1 if d is None else d for d in s.shape], s.dtype),
        ds.element_spec)).repeat()
    if counts is not None:
      num_batches = int(-(-counts[:, b].max() // batch))
      ds = ds.concatenate(pad).take(num_batches * batch)
    else:
      ds = ds.concatenate(pad.take(batch - 1))
    per_canvas.append(ds.batch(batch, drop_remainder=True))
  ds = functools.reduce(tf.data.Dataset.concatenate, per_canvas).prefetch(int(data.prefetch_batches))
  return ds.with_options(_options()), meta, len(canvases), expected
