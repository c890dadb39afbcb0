"""Prefetch host batches to the accelerator, keeping exact resume.

    it = prefetch_to_device(make_train_iterator(config), size=2, sharding=data_sharding)
    batch = next(it)          # jax.Array pytree
    it.save(prefix)           # the host iterator's position + the batches already on device

The batches already transferred are part of the input state: `save` writes them (host copies
are kept) next to the host iterator's checkpoint, and `restore` puts them back first, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

import collections

import numpy as np


class DevicePrefetchIterator:
  """Wraps a host iterator (`DataIterator`) and keeps `size` batches on device."""

  def __init__(self, host_iterator, size: int = 2, sharding=None):
    import jax  # pylint: disable=import-outside-toplevel  # only this module needs jax
    self._jax = jax
    self._host = host_iterator
    self._size = max(1, int(size))
    self._sharding = sharding
    self._queue = collections.deque()  # (host batch, device batch)

  def _put(self, batch):
    jax = self._jax
    if self._sharding is None:
      return jax.device_put(batch)
    if jax.process_count() > 1:
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self._sharding, x), batch)
    return jax.device_put(batch, self._sharding)

  def _fill(self):
    while len(self._queue) < self._size:
      try:
        host = next(self._host)
      except StopIteration:
        return
      self._queue.append((host, self._put(host)))

  def __iter__(self):
    return self

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    _, device = self._queue.popleft()
    self._fill()
    return device

  @property
  def stats(self):
    return self._host.stats

  def save(self, prefix: str) -> str:
    path = self._host.save(prefix)
    pending = {f"{i}/{k}": v for i, (host, _) in enumerate(self._queue) for k, v in host.items()}
    np.savez(prefix + ".pending.npz", count=len(self._queue), **pending)
    return path

  def restore(self, path: str, prefix: str | None = None) -> None:
    """`path` as returned by `save`; `prefix` the prefix given to `save` (default: from path)."""
    self._host.restore(path)
    prefix = prefix or path
    self._queue.clear()
    with np.load(prefix + ".pending.npz") as f:
      for i in range(int(f["count"])):
        host = {k.split("/", 1)[1]: f[k] for k in f.files if k.startswith(f"{i}/")}
        self._queue.append((host, self._put(host)))


def prefetch_to_device(host_iterator, size: int = 2, sharding=None) -> DevicePrefetchIterator:
  """Device-prefetching, checkpointable wrapper of a host batch iterator.

  `sharding`: a `jax.sharding.Sharding` for the global batch (on several hosts each host's
  batch is its process-local part); None: default device.
  """
  return DevicePrefetchIterator(host_iterator, size, sharding)


def normalization_table(mean, std) -> np.ndarray:
  """float32 [256, 3]: `(v - mean) / std` of every uint8 value v per channel, computed in numpy
  float32 (subtract, then divide: the detectron2 formula, IEEE-rounded)."""
  values = np.arange(256, dtype=np.float32)[:, None]
  return (values - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def normalize_on_device(batch: dict, mean, std) -> dict:
  """uint8 batch (`DataIterator.normalize_on_host=False`) -> the float32 batch, on device.

  `image` uint8 [B, H, W, 3] -> float32 `(x - mean) / std`, zero outside each image's
  `image_size`; adds `padding_mask` bool [B, H, W] (True = padded). The values are looked up in
  `normalization_table` (a 256 x 3 gather) rather than divided on the device: XLA's float32
  division on CPU (and TPU) is not IEEE-exact, the table is, so the result is bit-identical to
  `pipeline.normalize_batch`. Call it inside the jitted step (it fuses there) or on its own.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel  # only this module needs jax
  image = jnp.asarray(batch["image"])
  size = jnp.asarray(batch["image_size"])
  h, w = image.shape[1:3]
  mask = ((jnp.arange(h)[None, :, None] >= size[:, 0, None, None]) |
          (jnp.arange(w)[None, None, :] >= size[:, 1, None, None]))
  table = jnp.asarray(normalization_table(mean, std))
  x = table[image.astype(jnp.int32), jnp.arange(3)]                    # [B, H, W, 3] float32
  return {**batch, "image": jnp.where(mask[..., None], 0.0, x), "padding_mask": mask}
