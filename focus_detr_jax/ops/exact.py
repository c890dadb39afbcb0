"""Arithmetic that rounds exactly like the reference's float32 ops, whatever XLA rewrites.

XLA's algebraic simplifier turns `x / broadcast(d)` (and `x / constant`) into
`x * broadcast(1 / d)`: two roundings instead of one, so the quotient can move by one ulp. On the
detrex bounds that decides things: `49.5 / 50` is exactly `float32(0.99)` (invalid under
`< 0.99`), while `49.5 * float32(1 / 50)` is one ulp below it (valid). Two tools:

* `exact_divide`: a correctly rounded division on backends with IEEE division (CPU, GPU). The
  denominator goes through `lax.optimization_barrier`, so the simplifier no longer sees a
  broadcast or a constant and keeps a real divide.
* Host tables (`grid_axis_table`, `ratio_table`): where a result only depends on small static
  integers (a cell index and a valid count), numpy computes it once in IEEE float32 and the
  program gathers from the table. That is bit-exact on every backend, TPUs (whose division is
  not correctly rounded) included, and is what every bound-sensitive quantity uses.
"""

import jax
import jax.numpy as jnp
import numpy as np


def exact_divide(numerator, denominator):
  """Correctly rounded `numerator / denominator` (broadcasting), never rewritten by XLA.

  Args:
    numerator, denominator: arrays (or scalars) of one float dtype that broadcast together.
  Returns:
    the quotient at the broadcast shape.
  """
  numerator, denominator = jnp.broadcast_arrays(numerator, denominator)
  return numerator / jax.lax.optimization_barrier(denominator)


def grid_axis_table(size: int, dtype=np.float32) -> np.ndarray:
  """detrex's normalised cell centres `(i + 0.5) / valid` for every valid count, on the host.

  Returns:
    [size + 1, size] `dtype`: row v holds the coordinates of cells 0..size-1 when v of them are
    valid (row 0 divides by zero: +inf, which every bound check rejects).
  """
  dtype = np.dtype(dtype)
  centres = np.arange(size, dtype=dtype) + dtype.type(0.5)
  counts = np.arange(size + 1, dtype=dtype)
  with np.errstate(divide="ignore", invalid="ignore"):
    return centres[None, :] / counts[:, None]


def ratio_table(size: int, dtype=np.float32) -> np.ndarray:
  """`valid / size` for valid = 0..size, as torch's `valid.float() / size`: [size + 1]."""
  dtype = np.dtype(dtype)
  return np.arange(size + 1, dtype=dtype) / dtype.type(size)


def open_interval(values: np.ndarray, low: float, high: float) -> np.ndarray:
  """`(values > low) & (values < high)` with the bounds in the values' dtype (torch casts a
  Python scalar to the tensor's dtype before comparing)."""
  dtype = values.dtype.type
  return (values > dtype(low)) & (values < dtype(high))
