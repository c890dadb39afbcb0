"""Hungarian matching on device (focus_detr_jax/train/matcher.py)."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from focus_detr_jax.parity import loss_stages
from focus_detr_jax.train import matcher

from conftest import default_r50_dir  # noqa: E402

# shared/parity/public when present, else the in-repo compact R50 set (conftest).
PARITY_DIR = Path(os.environ.get("FOCUS_DETR_PARITY_DIR", default_r50_dir()))

needs_parity = pytest.mark.skipif(not (PARITY_DIR / "dn_train.npz").exists(),
                                  reason="parity reference data absent")

# One compiled solver per shape, vmapped over many problems.
_solve_batch = jax.jit(jax.vmap(matcher.solve_assignment))


def _scipy_optimum(cost, valid):
  """Optimal total cost (float64) over the real columns."""
  real = np.asarray(cost, np.float64)[:, valid]
  rows, cols = linear_sum_assignment(real)
  return real[rows, cols].sum()


def _check_against_scipy(costs, valid, rtol):
  query_index, num_nonfinite = jax.device_get(_solve_batch(costs, valid))
  assert np.all(num_nonfinite == 0)
  for cost, v, qi in zip(costs, valid, query_index):
    assert len(set(qi.tolist())) == len(qi), "two target slots share a query"
    ours = np.asarray(cost, np.float64)[qi[v], np.nonzero(v)[0]].sum()
    np.testing.assert_allclose(ours, _scipy_optimum(cost, v), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("num_queries,num_slots", [(12, 5), (30, 30), (60, 8), (7, 1)])
def test_total_cost_equals_scipy_on_random_costs(num_queries, num_slots):
  rng = np.random.default_rng(num_queries * 100 + num_slots)
  count = 64
  costs = rng.normal(size=(count, num_queries, num_slots)).astype(np.float32) * 10
  # Padded target slots, at random positions (and some images without any target).
  valid = rng.uniform(size=(count, num_slots)) < 0.7
  valid[:4] = False
  valid[4:8] = True
  _check_against_scipy(costs, valid, rtol=1e-5)


@pytest.mark.parametrize("num_queries,num_slots", [(12, 5), (30, 30)])
def test_total_cost_equals_scipy_with_ties(num_queries, num_slots):
  # Few distinct integer costs: many ties and many optimal assignments; totals must agree exactly.
  rng = np.random.default_rng(7)
  count = 64
  costs = rng.integers(0, 3, size=(count, num_queries, num_slots)).astype(np.float32)
  costs[:8] = 1.0  # all equal
  valid = rng.uniform(size=(count, num_slots)) < 0.8
  _check_against_scipy(costs, valid, rtol=0.0)


def test_nonfinite_costs_are_replaced_and_counted():
  rng = np.random.default_rng(3)
  cost = rng.uniform(size=(6, 3)).astype(np.float32)
  cost[0, 0] = np.nan
  cost[1, 1] = np.inf
  cost[2, 0] = -np.inf  # -inf would otherwise win: it is replaced by the large cost too
  cost[3, 2] = np.nan  # in a padded column: not counted
  valid = np.array([True, True, False])
  query_index, num_nonfinite = jax.device_get(_solve_batch(cost[None], valid[None]))
  assert int(num_nonfinite[0]) == 3
  replaced = np.where(np.isfinite(cost), cost, matcher.NONFINITE_COST)
  ours = replaced[query_index[0][valid], np.nonzero(valid)[0]].sum()
  np.testing.assert_allclose(ours, _scipy_optimum(replaced, valid), rtol=1e-6)
  assert query_index[0][0] not in (0, 2) and query_index[0][1] != 1  # non-finite entries avoided


def test_fewer_queries_than_slots_is_an_error():
  with pytest.raises(ValueError):
    matcher.solve_assignment(jnp.zeros((2, 3)), jnp.ones((3,), bool))


def test_match_leading_axes_equal_separate_calls():
  rng = np.random.default_rng(0)
  calls, batch, queries, classes, slots = 3, 2, 10, 4, 3
  logits = rng.normal(size=(calls, batch, queries, classes)).astype(np.float32)
  boxes = rng.uniform(0.2, 0.6, size=(calls, batch, queries, 4)).astype(np.float32)
  labels = rng.integers(0, classes, size=(batch, slots)).astype(np.int32)
  tboxes = rng.uniform(0.2, 0.6, size=(batch, slots, 4)).astype(np.float32)
  valid = np.array([[True, True, False], [True, False, False]])
  match = jax.jit(matcher.match)
  stacked = match(logits, boxes, labels, tboxes, valid)
  assert stacked.query_index.shape == (calls, batch, slots)
  np.testing.assert_array_equal(stacked.matched, np.broadcast_to(valid, (calls, batch, slots)))
  for c in range(calls):
    single = match(logits[c], boxes[c], labels, tboxes, valid)
    np.testing.assert_array_equal(np.where(valid, single.query_index, -1),
                                  np.where(valid, stacked.query_index[c], -1))


def test_cost_matches_detrex_formula():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 3)).astype(np.float32) * 3
  boxes = np.array([[0.5, 0.5, 0.2, 0.3], [0.3, 0.4, 0.1, 0.1], [0.6, 0.6, 0.5, 0.5],
                    [0.2, 0.7, 0.3, 0.2], [0.5, 0.5, 1.0, 1.0]], np.float32)
  labels = np.array([2, 0], np.int32)
  tboxes = np.array([[0.5, 0.5, 0.25, 0.25], [0.3, 0.3, 0.2, 0.4]], np.float32)
  cost = np.asarray(matcher.matching_cost(logits, boxes, labels, tboxes))
  # float64 reference of detrex HungarianMatcher (focal cost, cdist L1, GIoU with eps 1e-6).
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))[:, labels]
  focal = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p ** 2 * -np.log(1 - p + 1e-8)
  l1 = np.abs(boxes[:, None].astype(np.float64) - tboxes[None]).sum(-1)
  def xyxy(b):
    return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)
  a, b = xyxy(boxes.astype(np.float64))[:, None], xyxy(tboxes.astype(np.float64))[None]
  inter = np.prod(np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]),
                          0, None), -1)
  union = np.prod(a[..., 2:] - a[..., :2], -1) + np.prod(b[..., 2:] - b[..., :2], -1) - inter
  hull = np.prod(np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2]), -1)
  giou = inter / (union + 1e-6) - (hull - union) / (hull + 1e-6)
  np.testing.assert_allclose(cost, 5 * l1 + 2 * focal - 2 * giou, rtol=1e-5, atol=1e-5)


@needs_parity
def test_matchings_match_reference():
  rows = loss_stages.compare_matchings(PARITY_DIR)
  ran = [r for r in rows if r.passed is not None]
  assert len([r for r in ran if r.stage.startswith("dn_train.npz")]) == 7
  for row in ran:
    assert row.passed, row


_SHARDED_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from focus_detr_jax.train import matcher, sharding
assert jax.device_count() == 4
rng = np.random.default_rng(0)
calls, b, q, c, m = 3, 8, 12, 5, 4
logits = jnp.asarray(rng.normal(size=(calls, b, q, c)), jnp.float32)
boxes = jnp.asarray(rng.uniform(0.2, 0.6, size=(calls, b, q, 4)), jnp.float32)
labels = jnp.asarray(rng.integers(0, c, size=(b, m)), jnp.int32)
tboxes = jnp.asarray(rng.uniform(0.2, 0.6, size=(b, m, 4)), jnp.float32)
valid = jnp.asarray(rng.uniform(size=(b, m)) < 0.7)
fn = lambda *a: matcher.match(*a)
mesh = sharding.make_mesh()
with jax.set_mesh(mesh):
  jaxpr = str(jax.make_jaxpr(fn)(logits, boxes, labels, tboxes, valid))
  sharded = jax.jit(fn)(logits, boxes, labels, tboxes, valid)
plain_jaxpr = str(jax.make_jaxpr(fn)(logits, boxes, labels, tboxes, valid))
plain = jax.jit(fn)(logits, boxes, labels, tboxes, valid)
assert "shard_map" in jaxpr and "shard_map" not in plain_jaxpr
for a, p in zip(sharded, plain):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(p))
print("OK")
"""


def test_match_runs_under_shard_map_on_a_data_mesh():
  """With a `data` mesh in context the solver runs per device (shard_map), same matchings."""
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
