"""The accelerator half of the input normalisation (the training step's; the host half is
`iterators.normalize_batch`)."""

import jax.numpy as jnp
import numpy as np


def normalize_on_device(batch: dict, mean, std) -> dict:
  """uint8 batch (`make_train_iterator(normalize_on_host=False)`) -> the float32 batch, on device.

  `image` uint8 [B, H, W, 3] -> float32 `(x - mean) / std`, zero outside each image's
  `image_size`; adds `pixel_valid` bool [B, H, W] (True = image pixel, False = padding). Each
  uint8 value is looked up in a [256, 3] table computed in numpy float32 rather than divided on
  the device: XLA's float32 division on CPU (and TPU) is not IEEE-exact, the table is, so the
  result is bit-identical to `iterators.normalize_batch`. Call it inside the jitted step (it
  fuses there) or on its own.
  """
  image = jnp.asarray(batch["image"])
  size = jnp.asarray(batch["image_size"])
  h, w = image.shape[1:3]
  pixel_valid = ((jnp.arange(h)[None, :, None] < size[:, 0, None, None]) &
                 (jnp.arange(w)[None, None, :] < size[:, 1, None, None]))
  table = jnp.asarray((np.arange(256, dtype=np.float32)[:, None] - np.asarray(mean, np.float32))
                      / np.asarray(std, np.float32))
  x = table[image.astype(jnp.int32), jnp.arange(3)]                    # [B, H, W, 3] float32
  return {**batch, "image": jnp.where(pixel_valid[..., None], x, 0.0), "pixel_valid": pixel_valid}
