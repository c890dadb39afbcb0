"""Hungarian matching of predictions to ground truth, on device (spec §8, decisions §7).

detrex `HungarianMatcher` with the focal class cost: the same cost matrix, solved exactly inside
jit (a Hungarian algorithm, `min_cost_rows`) instead of scipy on the host. Targets are a fixed
number M of slots per image; the solver's loop runs over the real targets only, and padded slots
then take queries no real target wants (there are at least as many queries as slots).
decisions §7 names `optax.assignment.hungarian_algorithm` on the padded problem; this is the same
exact algorithm (optimal totals equal scipy's, tests/test_matcher.py), written here because
optax's loop runs over all M slots: 0.545 s against 0.0034 s for the 14 problems of an R50 step
(900 queries, M = 100, 8 real targets; BENCHMARKS.md, issue 17).

The result is one matched query per target slot: `query_index` [.., B, M] with `matched`
[.., B, M] (= the slot holds a real box). The per-image solver is vmapped; under a mesh with a
`data` axis it runs under `shard_map` (see `match`).

Shape letters: B images, Q queries, C classes, M target slots.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from focus_detr_jax.ops.boxes import box_cxcywh_to_xyxy, pairwise_generalized_box_iou
from focus_detr_jax.train.sharding import DATA_AXIS

# A non-finite cost (NaN/inf predictions) is replaced by this finite value so that the solver
# terminates; the count is reported. Finite costs are O(10) (focal <= ~5, L1 <= 20, GIoU <= 2),
# so 1e5 ranks last while float32 keeps ~1e-2 resolution around it.
NONFINITE_COST = 1e5
# detrex `generalized_box_iou` has eps 1e-6 in both denominators; the matcher uses it too.
GIOU_EPS = 1e-6
# A valid placeholder box for padded slots, so that no NaN is ever computed there.
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class MatcherConfig:
  """Weights of the matching cost (detrex `HungarianMatcher(cost_class=2, cost_bbox=5, ...)`)."""
  class_cost: float = 2.0
  bbox_cost: float = 5.0
  giou_cost: float = 2.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0

  @classmethod
  def from_config(cls, loss_config) -> "MatcherConfig":
    """From `config.loss` (configs/common.py)."""
    return cls(class_cost=loss_config.matcher_class_cost,
               bbox_cost=loss_config.matcher_bbox_cost,
               giou_cost=loss_config.matcher_giou_cost,
               focal_alpha=loss_config.focal_alpha,
               focal_gamma=loss_config.focal_gamma)


class Matching(NamedTuple):
  """Result of `match`, leading axes as in its inputs.

  Attributes:
    query_index: [..., B, M] int32, the query matched to target slot m (arbitrary where not
      `matched`; distinct within an image).
    matched: [..., B, M] bool, the slot holds a real target (every real target is matched).
    num_nonfinite: [..., B] int32, non-finite cost entries of real targets replaced before solving.
  """
  query_index: jax.Array
  matched: jax.Array
  num_nonfinite: jax.Array


def sanitize_targets(labels, boxes, box_valid):
  """Give padded target slots a valid label and box so no NaN/inf is computed for them.

  [..., M] int, [..., M, 4], [..., M] bool -> ([..., M] int32, [..., M, 4] float32).
  """
  labels = jnp.where(box_valid, labels, 0).astype(jnp.int32)
  dummy = jnp.asarray(_DUMMY_BOX, jnp.float32)
  boxes = jnp.where(box_valid[..., None], boxes.astype(jnp.float32), dummy)
  return labels, boxes


def matching_cost(pred_logits, pred_boxes, target_labels, target_boxes,
                  config: MatcherConfig = MatcherConfig()):
  """detrex focal-cost matching matrix of one image.

  `cost = bbox_cost * L1 + class_cost * (pos_focal - neg_focal)[:, label] - giou_cost * GIoU`,
  with `pos = a (1-p)^g (-log(p + 1e-8))`, `neg = (1-a) p^g (-log(1 - p + 1e-8))`, p = sigmoid,
  written in detrex's operation order (float32) so near-ties resolve the same way.

  Args:
    pred_logits: [Q, C] float.
    pred_boxes: [Q, 4] normalised cxcywh.
    target_labels: [M] int32 in [0, C).
    target_boxes: [M, 4] normalised cxcywh.

  Returns:
    [Q, M] float32.
  """
  prob = jax.nn.sigmoid(pred_logits.astype(jnp.float32))
  prob = jnp.take(prob, target_labels, axis=1)  # [Q, M]: only the target classes are needed
  alpha, gamma = config.focal_alpha, config.focal_gamma
  neg_cost = (1 - alpha) * (prob ** gamma) * (-jnp.log(1 - prob + 1e-8))
  pos_cost = alpha * ((1 - prob) ** gamma) * (-jnp.log(prob + 1e-8))
  cost_class = pos_cost - neg_cost
  pred_boxes = pred_boxes.astype(jnp.float32)
  cost_bbox = jnp.abs(pred_boxes[:, None, :] - target_boxes[None, :, :]).sum(-1)  # cdist p=1
  cost_giou = -pairwise_generalized_box_iou(
      box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes), eps=GIOU_EPS)
  return (config.bbox_cost * cost_bbox + config.class_cost * cost_class
          + config.giou_cost * cost_giou)


def solve_assignment(cost, target_valid):
  """Exact min-cost assignment of one image: [Q, M] cost, [M] bool -> ([M] int32, [] int32).

  Requires Q >= M (every slot gets a distinct query). Non-finite entries of real slots become
  NONFINITE_COST and are counted. Only the real slots are solved (`min_cost_rows`, whose loop
  stops after them): a padded slot costs the same for every query, so it does not change which
  queries the real targets get. Padded slots then take distinct queries no real target uses.

  Returns:
    (query_index [M] int32, num_nonfinite [] int32).
  """
  num_queries, num_slots = cost.shape
  if num_queries < num_slots:
    raise ValueError(f"need at least as many queries as target slots, got Q={num_queries} "
                     f"< M={num_slots}")
  finite = jnp.isfinite(cost)
  num_nonfinite = jnp.sum(~finite & target_valid[None, :]).astype(jnp.int32)
  cost = jnp.where(finite, cost, NONFINITE_COST)
  order = jnp.argsort(~target_valid, stable=True)       # [M] real slots first
  num_real = jnp.sum(target_valid).astype(jnp.int32)
  query_of_row = min_cost_rows(cost.T[order], num_real)  # [M], -1 past the real slots
  taken = jnp.zeros((num_queries,), bool).at[
      jnp.where(query_of_row >= 0, query_of_row, num_queries)].set(True, mode="drop")
  spare = jnp.argsort(taken, stable=True)                # [Q] untaken queries first
  row = jnp.arange(num_slots)
  query_of_row = jnp.where(row < num_real, query_of_row,
                           spare[jnp.maximum(row - num_real, 0)])
  query_index = jnp.zeros((num_slots,), jnp.int32).at[order].set(query_of_row)
  return query_index, num_nonfinite


def min_cost_rows(cost, num_rows):
  """Rows 0..num_rows-1 of `cost` each get a distinct column at minimum total cost.

  The shortest-augmenting-path Hungarian algorithm (row and column potentials; one Dijkstra
  search per added row), the form optax and scenic use, but with a loop that stops after
  `num_rows` rows (traced), so padded rows cost nothing.

  Args:
    cost: [R, Q] finite float, R <= Q.
    num_rows: [] int32 <= R.

  Returns:
    [R] int32: the column of each row; -1 for rows >= num_rows.
  """
  num_r, num_q = cost.shape
  start = num_q    # an extra column that holds the row being added (the algorithm's "column 0")
  sink = num_r     # an extra row index that absorbs scatters from columns nobody owns
  cost = jnp.concatenate([cost, jnp.full((num_r, 1), jnp.inf, cost.dtype)], axis=1)

  def add_row(carry):
    i, u, v, owner = carry              # owner: [Q + 1] row holding each column, -1 = free
    owner = owner.at[start].set(i)

    def search(s):                      # one Dijkstra step: settle the nearest column
      u, v, used, dist, came_from, col = s
      used = used.at[col].set(True)
      row = owner[col]
      reduced = cost[row] - u[row] - v
      closer = ~used & (reduced < dist)
      dist = jnp.where(closer, reduced, dist)
      came_from = jnp.where(closer, col, came_from)
      open_dist = jnp.where(used, jnp.inf, dist)
      nearest = jnp.argmin(open_dist).astype(jnp.int32)
      delta = open_dist[nearest]
      u = u.at[jnp.where(used, owner, sink)].add(jnp.where(used, delta, 0))
      v = jnp.where(used, v - delta, v)
      dist = jnp.where(used, dist, dist - delta)
      return u, v, used, dist, came_from, nearest

    u, v, _, _, came_from, col = jax.lax.while_loop(
        lambda s: owner[s[5]] >= 0, search,
        (u, v, jnp.zeros((num_q + 1,), bool), jnp.full((num_q + 1,), jnp.inf, cost.dtype),
         jnp.full((num_q + 1,), start, jnp.int32), jnp.int32(start)))

    def augment(s):                     # shift owners back along the path to the free column
      owner, col = s
      prev = came_from[col]
      return owner.at[col].set(owner[prev]), prev

    owner, _ = jax.lax.while_loop(lambda s: s[1] != start, augment, (owner, col))
    return i + 1, u, v, owner

  init = (jnp.int32(0), jnp.zeros((num_r + 1,), cost.dtype),
          jnp.zeros((num_q + 1,), cost.dtype), jnp.full((num_q + 1,), -1, jnp.int32))
  _, _, _, owner = jax.lax.while_loop(lambda c: c[0] < num_rows, add_row, init)
  owner = owner[:num_q]
  return jnp.full((num_r + 1,), -1, jnp.int32).at[jnp.where(owner >= 0, owner, sink)].set(
      jnp.arange(num_q, dtype=jnp.int32))[:num_r]


def match_image(pred_logits, pred_boxes, target_labels, target_boxes, target_valid,
                config: MatcherConfig = MatcherConfig()):
  """One image: [Q, C], [Q, 4], [M], [M, 4], [M] -> (query_index [M], num_nonfinite [])."""
  labels, boxes = sanitize_targets(target_labels, target_boxes, target_valid)
  cost = matching_cost(pred_logits, pred_boxes, labels, boxes, config)
  return solve_assignment(cost, target_valid)


def match(pred_logits, pred_boxes, target_labels, target_boxes, target_valid,
          config: MatcherConfig = MatcherConfig()) -> Matching:
  """Hungarian matching of a batch, with any number of leading axes (e.g. the 7 matcher calls).

  Gradients do not flow through the matching (detrex runs it under `torch.no_grad`). When traced
  under a mesh with a `data` axis (`jax.set_mesh`, as the training loop does) and the batch
  splits evenly over it, the solver runs under `shard_map`: each device solves its own images
  with no communication (under plain jit with a sharded batch, the solver's while-loop
  conditions would be all-reduced every iteration; decisions §7). Same results either way.

  Args:
    pred_logits: [..., B, Q, C].
    pred_boxes: [..., B, Q, 4] normalised cxcywh.
    target_labels: [B, M] int.
    target_boxes: [B, M, 4] normalised cxcywh.
    target_valid: [B, M] bool.

  Returns:
    `Matching` with `query_index`/`matched` [..., B, M] and `num_nonfinite` [..., B].
  """
  pred_logits = jax.lax.stop_gradient(pred_logits)
  pred_boxes = jax.lax.stop_gradient(pred_boxes)
  lead = pred_logits.shape[:-3]
  batch = pred_logits.shape[-3]
  solve = functools.partial(_match_local, config=config)
  mesh = jax.sharding.get_abstract_mesh()
  if (not mesh.empty and DATA_AXIS in mesh.axis_names and mesh.shape[DATA_AXIS] > 1
      and batch % mesh.shape[DATA_AXIS] == 0):
    none = (None,) * len(lead)
    per_query = P(*none, DATA_AXIS)     # [..., B, Q, *] split on B
    per_image = P(DATA_AXIS)            # [B, ...]
    solve = jax.shard_map(solve, mesh=mesh,
                          in_specs=(per_query, per_query, per_image, per_image, per_image),
                          out_specs=(per_query, per_query),
                          # the solver starts its while-loop carries from constants, which
                          # the varying-axes check would reject; every value is per device.
                          check_vma=False)
  query_index, num_nonfinite = solve(pred_logits, pred_boxes, target_labels, target_boxes,
                                     target_valid)
  matched = jnp.broadcast_to(target_valid, query_index.shape)
  return Matching(query_index, matched, num_nonfinite)


def _match_local(pred_logits, pred_boxes, target_labels, target_boxes, target_valid,
                 config: MatcherConfig):
  """`match` on the images at hand: ([..., B, M] query_index, [..., B] num_nonfinite)."""
  lead = pred_logits.shape[:-3]
  batch, num_queries, num_classes = pred_logits.shape[-3:]
  per_image = jax.vmap(lambda lg, bx, lb, tb, tv: match_image(lg, bx, lb, tb, tv, config))
  # Fold the leading axes into the batch so one vmapped solver runs every problem at once.
  num_calls = math.prod(lead)
  query_index, num_nonfinite = per_image(
      pred_logits.reshape((-1, num_queries, num_classes)),  # [calls * B, Q, C]
      pred_boxes.reshape((-1, num_queries, 4)),
      jnp.tile(target_labels, (num_calls, 1)),  # [calls * B, M]
      jnp.tile(target_boxes, (num_calls, 1, 1)),
      jnp.tile(target_valid, (num_calls, 1)))
  num_slots = target_labels.shape[-1]
  return (query_index.reshape(lead + (batch, num_slots)),
          num_nonfinite.reshape(lead + (batch,)))
