"""Scale-bucketed canvases and the training-step schedule (decisions §4, revised).

detrex (detectron2) draws every training image once per epoch in random order, augments each on
its own (flip; 50/50 a multi-scale resize, or resize -> crop -> multi-scale resize), pairs images
of the same orientation (`w > h` or not, of the *original* image: `AspectRatioGroupedDataset`)
into per-GPU batches of 2 and pads each pair to its own maximum (`ImageList`, no size
divisibility). jit needs static shapes, so we choose, per training step:

  group(t)    the orientation of step t: 0 = landscape (w > h), 1 = the others (detrex's rule).
              Low-discrepancy: among the first t steps, floor((t * n0 + phase) / n) are
              landscape, with n0 / n the data's landscape share (integer counts). Each group gets
              its share of the steps, so every image is drawn equally often whatever its
              orientation (each group's stream is a shuffled repeat of its images).
  k(t)        how many earlier steps had the same group: the batch index in that group's stream.
  scale(g, k) the multi-scale target (short side), a stateless uniform draw over `train_scales`
              keyed by (seed, g, k): the same for the whole step, so the canvas can follow it.
  canvas      `canvases[g * num_buckets + bucket(scale)]`.

Every quantity is a pure function of the step (and the config), identical on every host, and
needs no state to resume. The per-image marginal distribution stays detrex's: flip and branch
per image, the scale uniform over `train_scales`; only the correlation inside a batch differs
(a step's images share their scale and orientation). With one bucket the scale is drawn per image
as before.

The second half of this file is host-side numpy: detectron2's size arithmetic, a simulation of
detrex's batch-max padding and of our canvases on a list of image sizes, and the search that
chooses the canvases (`choose_train_canvases`, `choose_eval_canvases`).
"""

import dataclasses
import itertools

import numpy as np
import tensorflow as tf

Canvas = tuple[int, int]  # (H, W)

# An approximation of COCO train2017's image sizes (COCO itself is not on this machine): long side
# 640 for almost every image; (h, w, share). Shares are our estimate, not a measurement; the
# canvas choice is re-checked on other mixes in tests/test_canvas_buckets.py.
COCO_LIKE_SIZE_MIX = (
    (480, 640, 0.42),   # 4:3 landscape
    (427, 640, 0.20),   # 3:2 landscape
    (360, 640, 0.04),   # 16:9 landscape
    (640, 480, 0.17),   # 3:4 portrait
    (640, 427, 0.10),   # 2:3 portrait
    (640, 640, 0.03),   # square
    (512, 640, 0.02),   # 5:4
    (300, 640, 0.01),   # wide panorama
    (640, 360, 0.01),   # 9:16 portrait
)


# A second mix to check that canvases chosen on the first hold elsewhere: more portrait, 3:2, 16:9.
ALTERNATIVE_SIZE_MIX = ((480, 640, 0.30), (427, 640, 0.25), (360, 640, 0.08), (640, 480, 0.20),
                        (640, 427, 0.12), (640, 640, 0.05))


def size_mix_sample(mix=COCO_LIKE_SIZE_MIX, n: int = 4000, seed: int = 0) -> np.ndarray:
  """int [n, 2] (h, w) drawn from a `(h, w, share)` mix."""
  shares = np.asarray([s for _, _, s in mix], np.float64)
  idx = np.random.default_rng(seed).choice(len(mix), size=n, p=shares / shares.sum())
  return np.asarray([(h, w) for h, w, _ in mix], np.int64)[idx]


# ----------------------------------------------------------------------------- the schedule

def aspect_group(h, w, group_bounds):
  """Group of (h, w) sizes (numpy): how many of the h/w `group_bounds` (ascending) are <= h/w.

  `group_bounds=(1.0,)` is detrex's rule: 0 landscape (w > h), 1 otherwise.
  """
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  return sum(((h >= b * w).astype(np.int64) for b in group_bounds),
             np.zeros(np.broadcast(h, w).shape, np.int64))


def tf_aspect_group(h, w, group_bounds) -> tf.Tensor:
  """In-graph `aspect_group` of scalar sizes: int32."""
  h, w = tf.cast(h, tf.float64), tf.cast(w, tf.float64)
  return sum((tf.cast(h >= b * w, tf.int32) for b in group_bounds), tf.constant(0, tf.int32))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Static description of the training-step schedule (built once from the data config).

  `group_bounds`: the h/w bounds of the aspect groups (`aspect_group`); `group_counts`: the
  integer weight of each group (its share of the augmented images); `scales`: the multi-scale
  targets; `buckets`: the scale bucket of each scale; `canvases`: group-major,
  `num_groups * num_buckets` shapes.
  """
  group_bounds: tuple[float, ...]
  group_counts: tuple[int, ...]
  scales: tuple[int, ...]
  buckets: tuple[int, ...]
  canvases: tuple[Canvas, ...]
  seed: int

  @property
  def num_groups(self) -> int:
    return len(self.group_bounds) + 1

  @property
  def num_buckets(self) -> int:
    return max(self.buckets) + 1

  @property
  def scale_per_step(self) -> bool:
    return self.num_buckets > 1

  def canvas_index(self, group: int, bucket: int) -> int:
    return group * self.num_buckets + bucket


def make_schedule(canvases, scales, scale_buckets, group_bounds, group_counts,
                  seed: int) -> Schedule:
  """Validates and builds a `Schedule`.

  `scale_buckets`: None (one bucket: the scale is drawn per image) or a partition of `scales`;
  `group_bounds`: ascending h/w bounds (`len(canvases) / num_buckets - 1` of them);
  `group_counts`: one non-negative weight per group (None: equal).
  """
  canvases = tuple((int(h), int(w)) for h, w in canvases)
  scales = tuple(int(s) for s in scales)
  group_bounds = tuple(float(b) for b in (group_bounds or ()))
  if list(group_bounds) != sorted(group_bounds) or any(b <= 0 for b in group_bounds):
    raise ValueError(f"group_bounds must be ascending positive h/w ratios, got {group_bounds}.")
  if scale_buckets:
    flat = [int(s) for b in scale_buckets for s in b]
    if sorted(flat) != sorted(scales):
      raise ValueError(f"scale_buckets {scale_buckets} must partition train_scales {scales}.")
    bucket_of = {int(s): i for i, b in enumerate(scale_buckets) for s in b}
    buckets = tuple(bucket_of[s] for s in scales)
  else:
    buckets = (0,) * len(scales)
  nb = max(buckets) + 1
  groups = len(group_bounds) + 1
  if len(canvases) != groups * nb or any(h <= 0 or w <= 0 for h, w in canvases):
    raise ValueError(f"{len(canvases)} canvases for {groups} aspect groups x {nb} scale "
                     f"buckets: need {groups * nb} positive (H, W), group-major.")
  counts = _integer_weights(group_counts, groups)
  return Schedule(group_bounds, counts, scales, buckets, canvases, int(seed))


def _integer_weights(weights, groups: int) -> tuple[int, ...]:
  if weights is None:
    return (1,) * groups
  w = np.asarray(weights, np.float64)
  if w.shape != (groups,) or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
    raise ValueError(f"group weights must be {groups} non-negative numbers, got {weights}.")
  if np.all(w == np.round(w)) and w.sum() < 2**31:
    return tuple(int(v) for v in w)
  return tuple(int(v) for v in np.round(w / w.sum() * 1_000_000))


def _split_step(step, lo, hi, counts, seed, node, where, floordiv):
  """(group, index within the group) of `step` among groups [lo, hi): a binary tree of
  low-discrepancy two-way splits (each node gives its left half floor((t a + phase) / n) of
  its first t steps, a / n being the left half's weight)."""
  if hi - lo == 1:
    return lo, step
  mid = (lo + hi) // 2
  a, total = sum(counts[lo:mid]), sum(counts[lo:hi])
  if a == 0:
    return _split_step(step, mid, hi, counts, seed, 2 * node + 2, where, floordiv)
  if a == total:
    return _split_step(step, lo, mid, counts, seed, 2 * node + 1, where, floordiv)
  phase = int(np.random.default_rng([seed, 7919, node]).integers(0, total)) if total > 1 else 0
  before = floordiv(step * a + phase, total) - phase // total
  is_left = floordiv((step + 1) * a + phase, total) - phase // total > before
  gl, kl = _split_step(before, lo, mid, counts, seed, 2 * node + 1, where, floordiv)
  gr, kr = _split_step(step - before, mid, hi, counts, seed, 2 * node + 2, where, floordiv)
  return where(is_left, gl, gr), where(is_left, kl, kr)


def tf_group_for_step(step: tf.Tensor, schedule: Schedule) -> tf.Tensor:
  """int64 group of training step `step`, in-graph (`_split_step` on tensors)."""
  step = tf.cast(step, tf.int64)
  g, _ = _split_step(step, 0, schedule.num_groups, schedule.group_counts, schedule.seed, 0,
                     lambda c, x, y: tf.where(c, tf.cast(x, tf.int64), tf.cast(y, tf.int64)),
                     tf.math.floordiv)
  return tf.cast(g, tf.int64)


def group_schedule_dataset(schedule: Schedule) -> tf.data.Dataset:
  """Infinite dataset of the group of each step from step 0 (for `choose_from_datasets`)."""
  return tf.data.Dataset.range(1 << 62).map(tf.autograph.experimental.do_not_convert(
      lambda s: tf_group_for_step(s, schedule)))


def tf_scale_for(group, k, schedule: Schedule) -> tf.Tensor:
  """int32 scale of batch `k` of `group` (stateless uniform over `scales`, keyed by seed, g, k)."""
  key = tf.stack([tf.constant(schedule.seed, tf.int64) + 104729,
                  tf.cast(group, tf.int64) * (1 << 48) + tf.cast(k, tf.int64)])
  idx = tf.random.stateless_uniform([], key, minval=0, maxval=len(schedule.scales),
                                    dtype=tf.int32)
  return tf.gather(tf.constant(schedule.scales, tf.int32), idx)


def tf_canvas_for(group, scale, schedule: Schedule) -> tf.Tensor:
  """int32 [2] canvas (H, W) of `group` at multi-scale target `scale`."""
  hit = tf.cast(tf.equal(tf.constant(schedule.scales, tf.int32), scale), tf.int32)
  b = tf.gather(tf.constant(schedule.buckets, tf.int32), tf.argmax(hit, output_type=tf.int32))
  idx = tf.cast(group, tf.int32) * schedule.num_buckets + b
  return tf.gather(tf.constant(schedule.canvases, tf.int32), idx)


# ----------------------------------------------------------------------------- size arithmetic

def resize_shortest_edge(h, w, short, max_size):
  """detectron2 `ResizeShortestEdge.get_output_shape`, vectorised: (new h, new w) int arrays."""
  h = np.asarray(h, np.float64)
  w = np.asarray(w, np.float64)
  short = np.asarray(short, np.float64)
  scale = short / np.minimum(h, w)
  newh = np.where(h < w, short, scale * h)
  neww = np.where(h < w, scale * w, short)
  if max_size and max_size > 0:
    over = np.maximum(newh, neww) > max_size
    rescale = max_size / np.maximum(newh, neww)
    newh = np.where(over, newh * rescale, newh)
    neww = np.where(over, neww * rescale, neww)
  return (np.maximum(np.floor(newh + 0.5), 1).astype(np.int64),
          np.maximum(np.floor(neww + 0.5), 1).astype(np.int64))


def augmented_sizes(hw, data, rng, scales=None, group_bounds=(1.0,)):
  """Final (h, w) of each image after detrex's training augmentation (sizes only).

  `hw` int [N, 2]; `scales` int [N] (None: drawn uniformly per image). Returns (h, w, crop bool,
  group int): `group` is the orientation of the image before its final resize (the crop's, or the
  original's), which the final resize keeps: 0 landscape (w > h), 1 otherwise.
  """
  hw = np.asarray(hw, np.int64)
  n = len(hw)
  if scales is None:
    scales = rng.choice(np.asarray(data.train_scales), size=n)
  crop = rng.random(n) < (float(data.crop_prob) if data.augment else 0.0)
  h1, w1 = resize_shortest_edge(hw[:, 0], hw[:, 1], rng.choice(np.asarray(data.crop_resize_scales), size=n),
                                int(data.crop_resize_max_size or 0))
  lo, hi = (int(v) for v in data.crop_size_range)
  ch = rng.integers(np.minimum(h1, lo), np.minimum(h1, hi) + 1)
  cw = rng.integers(np.minimum(w1, lo), np.minimum(w1, hi) + 1)
  h, w = np.where(crop, ch, hw[:, 0]), np.where(crop, cw, hw[:, 1])
  fh, fw = resize_shortest_edge(h, w, scales, int(data.train_max_size))
  return fh, fw, crop, aspect_group(h, w, group_bounds)


def group_shares(hw, data, group_bounds, seed: int = 0, draws: int = 8) -> np.ndarray:
  """float [G]: the share of each aspect group among augmented images of sizes `hw` (the
  schedule's weights: each image is then drawn equally often whatever its orientation)."""
  rng = np.random.default_rng(seed)
  sel = np.repeat(np.asarray(hw, np.int64).reshape(-1, 2), draws, axis=0)
  _, _, _, groups = augmented_sizes(sel, data, rng, None, group_bounds)
  return np.bincount(groups, minlength=len(group_bounds) + 1) / max(len(groups), 1)


def detrex_pixels_per_image(hw, data, seed: int = 0, epochs: int = 4, per_gpu_batch: int = 2):
  """Mean padded pixels per training image in detrex: random order, orientation-paired batches
  of `per_gpu_batch` padded to their own maximum. Also returns the mean unpadded pixels."""
  rng = np.random.default_rng(seed)
  hw = np.asarray(hw, np.int64)
  areas, own = [], []
  for _ in range(epochs):
    order = rng.permutation(len(hw))
    fh, fw, _, _ = augmented_sizes(hw[order], data, rng)
    groups = (hw[order, 1] <= hw[order, 0]).astype(np.int64)  # the original's orientation
    for g in (0, 1):
      sel = np.nonzero(groups == g)[0]
      m = len(sel) // per_gpu_batch * per_gpu_batch
      ph = fh[sel[:m]].reshape(-1, per_gpu_batch).max(axis=1)
      pw = fw[sel[:m]].reshape(-1, per_gpu_batch).max(axis=1)
      areas.append(np.repeat(ph * pw, per_gpu_batch))
    own.append(fh * fw)
  return float(np.concatenate(areas).mean()), float(np.concatenate(own).mean())


@dataclasses.dataclass(frozen=True)
class CanvasStats:
  pixels_per_image: float      # mean canvas area per training image
  fill: float                  # mean (image area / canvas area)
  rescaled: float              # fraction of images scaled down to fit
  rescaled_plain: float        # ... of those from the plain (no-crop) branch
  rescaled_crop: float         # ... of those from the crop branch


def bucketed_canvas_stats(hw, data, schedule: Schedule, seed: int = 0,
                          draws: int = 4) -> CanvasStats:
  """Our canvases on the same images: each image `draws` times, the step's scale uniform."""
  rng = np.random.default_rng(seed)
  hw = np.repeat(np.asarray(hw, np.int64), draws, axis=0)
  scales = rng.choice(np.asarray(schedule.scales), size=len(hw))
  if not schedule.scale_per_step:
    scales = rng.choice(np.asarray(data.train_scales), size=len(hw))
  fh, fw, crop, groups = augmented_sizes(hw, data, rng, scales, schedule.group_bounds)
  bucket_of = dict(zip(schedule.scales, schedule.buckets))
  b = np.asarray([bucket_of.get(int(s), 0) for s in scales]) if schedule.scale_per_step else (
      np.zeros(len(hw), np.int64))
  canv = np.asarray(schedule.canvases, np.int64)[groups * schedule.num_buckets + b]
  fits = (fh <= canv[:, 0]) & (fw <= canv[:, 1])
  scale = np.minimum(np.minimum(canv[:, 0] / fh, canv[:, 1] / fw), 1.0)
  area_in = np.floor(fh * scale + 0.5) * np.floor(fw * scale + 0.5)
  area = canv[:, 0] * canv[:, 1]
  return CanvasStats(float(area.mean()), float((area_in / area).mean()),
                     float((~fits).mean()), float((~fits & ~crop).mean()),
                     float((~fits & crop).mean()))


def _best_canvas(fh, fw, max_rescale: float) -> tuple[Canvas, float]:
  """Smallest-area (H, W) holding all but `max_rescale` of the sizes; returns it and its area."""
  qs = np.linspace(0.8, 1.0, 41)
  hs = np.unique(np.quantile(fh, qs, method="higher").astype(np.int64))
  ws = np.unique(np.quantile(fw, qs, method="higher").astype(np.int64))
  fit = ((fh[:, None, None] <= hs[None, :, None]) &
         (fw[:, None, None] <= ws[None, None, :])).mean(axis=0)
  area = hs[:, None] * ws[None, :]
  area = np.where(fit >= 1.0 - max_rescale - 1e-12, area, np.iinfo(np.int64).max)
  i, j = np.unravel_index(np.argmin(area), area.shape)
  return (int(hs[i]), int(ws[j])), float(area[i, j])


def choose_train_canvases(hw, data, num_buckets: int = 4, max_rescale: float = 0.02,
                          seed: int = 0, draws: int = 8, group_bounds=(1.0,)):
  """(scale_buckets, canvases) minimising the expected canvas area per image on sizes `hw`.

  Two orientation groups (detrex's); `num_buckets` contiguous buckets of `train_scales` each;
  every canvas holds all but `max_rescale` of its (simulated) images. Exhaustive over the
  partitions of the scales (C(10, 3) = 120 for COCO's 11 scales and 4 buckets).
  """
  rng = np.random.default_rng(seed)
  hw = np.asarray(hw, np.int64)
  scales = tuple(sorted(int(s) for s in data.train_scales))
  sel = np.repeat(hw, draws, axis=0)
  # Simulated final sizes of each group at each scale (the same draws for every scale).
  state = rng.bit_generator.state
  sims = {}
  for s in scales:
    rng.bit_generator.state = state
    fh, fw, _, groups = augmented_sizes(sel, data, rng, np.full(len(sel), s), group_bounds)
    for g in range(len(group_bounds) + 1):
      if (groups == g).any():
        sims[g, s] = (fh[groups == g], fw[groups == g])
  share = np.bincount(groups, minlength=len(group_bounds) + 1) / len(groups)
  best = None
  for cuts in itertools.combinations(range(1, len(scales)), num_buckets - 1):
    bounds = (0,) + cuts + (len(scales),)      # contiguous runs of the sorted scales
    runs = [scales[bounds[i]:bounds[i + 1]] for i in range(num_buckets)]
    cost, canvases = 0.0, []
    for g in range(len(group_bounds) + 1):
      for run in runs:
        if (g, run[0]) not in sims:
          canvases.append(canvases[-len(runs)] if len(canvases) >= len(runs) else (1, 1))
          continue
        fh = np.concatenate([sims[g, s][0] for s in run])
        fw = np.concatenate([sims[g, s][1] for s in run])
        canvas, area = _best_canvas(fh, fw, max_rescale)
        canvases.append(canvas)
        cost += share[g] * len(run) / len(scales) * area
    if best is None or cost < best[0]:
      best = (cost, tuple(runs), tuple(canvases))
  return best[1], best[2]


def eval_sizes(hw, data):
  """(h, w) int arrays of the evaluation resize."""
  hw = np.asarray(hw, np.int64)
  return resize_shortest_edge(hw[:, 0], hw[:, 1], int(data.eval_scale), int(data.eval_max_size))


def choose_eval_canvases(hw, data, per_group: int = 3) -> tuple[Canvas, ...]:
  """Evaluation canvases: per orientation, `per_group` shapes that hold every image exactly.

  Images sorted by their long side are cut into `per_group` runs, each padded to its run's
  maximum; the cuts minimise the total canvas area (exhaustive over quantile cut points).
  """
  fh, fw = eval_sizes(hw, data)
  out = []
  for g, long in ((0, fw), (1, fh)):
    sel = (fw > fh) if g == 0 else (fw <= fh)
    if not sel.any():
      continue
    h, w, lg = fh[sel], fw[sel], long[sel]
    cands = np.unique(np.quantile(lg, np.linspace(0, 1, 41), method="higher").astype(np.int64))
    best = None
    for cuts in itertools.combinations(cands[:-1], min(per_group, len(cands)) - 1):
      bounds = list(cuts) + [int(lg.max())]
      cost, canvases, lo = 0.0, [], -1
      for b in bounds:
        part = (lg > lo) & (lg <= b)
        lo = b
        if not part.any():
          continue
        c = (int(h[part].max()), int(w[part].max()))
        canvases.append(c)
        cost += part.sum() * c[0] * c[1]
      if best is None or cost < best[0]:
        best = (cost, canvases)
    out.extend(best[1])
  return tuple(dict.fromkeys(out))


def eval_pixels_per_image(hw, data, canvases) -> tuple[float, float, float]:
  """(mean canvas area, mean image area, fraction rescaled) when each eval image goes to the
  smallest canvas that holds it (`transforms.tf_eval_canvas_index`'s rule)."""
  fh, fw = eval_sizes(hw, data)
  c = np.asarray(canvases, np.int64)
  fits = (fh[:, None] <= c[None, :, 0]) & (fw[:, None] <= c[None, :, 1])
  area = np.where(fits, c[None, :, 0] * c[None, :, 1], np.iinfo(np.int64).max)
  best = area.min(axis=1)
  rescaled = best == np.iinfo(np.int64).max
  best = np.where(rescaled, c[:, 0].max() * c[:, 1].max(), best)
  return float(best.mean()), float((fh * fw).mean()), float(rescaled.mean())
