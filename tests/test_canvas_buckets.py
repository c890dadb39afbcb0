"""Scale-bucketed canvases: the step schedule and the canvas choice (data/buckets.py)."""

import numpy as np
import pytest
import tensorflow as tf

from configs import common
import data_helpers as helpers
from focus_detr_jax.data import buckets
from focus_detr_jax.data import datasets
from focus_detr_jax.data import streams
from focus_detr_jax.data import transforms
from focus_detr_jax.data.datasets import DataConfig

COCO = common.get_data_config("coco")
# Another size mix than the one the defaults were chosen on: more portrait, more 3:2 and 16:9.
OTHER_MIX = buckets.ALTERNATIVE_SIZE_MIX


def _schedule(counts, bounds=(1.0,), buckets_=None, seed=3):
  nb = len(buckets_) if buckets_ else 1
  canvases = [(100 + 10 * i, 200 + 10 * i) for i in range((len(bounds) + 1) * nb)]
  return buckets.make_schedule(canvases, COCO.train_scales, buckets_, bounds, counts, seed)


@pytest.mark.parametrize("counts,bounds", [((3, 1), (1.0,)), ((5, 0, 2, 1), (0.7, 1.0, 1.4)),
                                           ((0.42, 0.58), (1.0,))])
def test_each_group_gets_exactly_its_share_of_the_steps(counts, bounds):
  s = _schedule(counts, bounds)
  share = np.asarray(s.group_counts, np.float64) / sum(s.group_counts)
  groups = [helpers.group_for_step(t, s) for t in range(600)]
  seen = np.zeros(len(share), np.int64)
  for t, (g, k) in enumerate(groups):
    assert k == seen[g]                       # the batch index in that group's stream
    seen[g] += 1
    # Low discrepancy: after every step each group is within 2 steps of its share.
    assert np.abs(seen - (t + 1) * share).max() < 2.0
  assert all(seen[g] == 0 for g in range(len(share)) if share[g] == 0)
  tf_groups = buckets.group_schedule_dataset(s).take(600)
  assert [int(g) for g in tf_groups.as_numpy_iterator()] == [g for g, _ in groups]


def test_schedule_is_a_function_of_the_step_and_the_seed():
  s = _schedule((1, 1), buckets_=((480, 512, 544, 576, 608, 640), (672, 704, 736, 768, 800)))
  a = [helpers.plan_for_step(t, s) for t in (0, 7, 123, 7)]
  assert a[1] == a[3]
  scales = [helpers.plan_for_step(t, s).scale for t in range(300)]
  counts = np.bincount([COCO.train_scales.index(v) for v in scales], minlength=11)
  assert counts.min() > 0.5 * 300 / 11      # uniform over the 11 scales
  other = _schedule((1, 1), buckets_=((480, 512, 544, 576, 608, 640), (672, 704, 736, 768, 800)),
                    seed=4)
  assert [helpers.plan_for_step(t, other).scale for t in range(300)] != scales
  for t in range(40):
    p = helpers.plan_for_step(t, s)
    assert p.canvas == s.canvases[s.canvas_index(p.group, s.buckets[s.scales.index(p.scale)])]


def test_bad_schedules_are_refused():
  with pytest.raises(ValueError, match="partition"):
    _schedule((1, 1), buckets_=((480, 512),))
  with pytest.raises(ValueError, match="canvases"):
    buckets.make_schedule(((10, 10),) * 3, (1, 2), None, (1.0,), None, 0)
  with pytest.raises(ValueError, match="weights"):
    _schedule((1, -1))


def test_tf_plan_draws_what_the_size_simulation_draws():
  """`transforms.train_plan` (TF) groups images as `buckets.aspect_group` says."""
  cfg = datasets.DataConfig.from_config(COCO)
  for hw in ((480, 640), (640, 427), (500, 500)):
    for i in range(20):
      plan = transforms.train_plan(tf.constant(hw, tf.int32), tf.constant([0, i], tf.int64), cfg,
                                   (0.72, 1.0, 1.4))
      box = plan["crop_box"].numpy()
      pre = box[2:] if bool(plan["crop"]) else np.asarray(hw)
      assert int(plan["group"]) == int(buckets.aspect_group(pre[0], pre[1], (0.72, 1.0, 1.4)))
      if bool(plan["crop"]):
        h1, w1 = buckets.resize_shortest_edge(hw[0], hw[1], int(plan["short1"]), 0)
        assert min(h1, 384) <= box[2] <= min(h1, 600) and box[0] + box[2] <= h1
        assert min(w1, 384) <= box[3] <= min(w1, 600) and box[1] + box[3] <= w1


def test_detrex_simulation_pads_pairs_to_their_maximum():
  one = COCO.copy_and_resolve_references()
  one.train_scales, one.crop_prob = (600,), 0.0
  same = np.tile([[480, 640]], (50, 1))
  padded, own = buckets.detrex_pixels_per_image(same, one)
  assert padded == own == 600 * 800                       # identical images: no padding
  padded, own = buckets.detrex_pixels_per_image(buckets.size_mix_sample(n=400), COCO)
  assert padded > own


@pytest.mark.parametrize("mix", [buckets.COCO_LIKE_SIZE_MIX, OTHER_MIX])
def test_default_coco_canvases_cost_at_most_1_15x_detrex(mix):
  hw = buckets.size_mix_sample(mix, n=3000, seed=1)
  detrex, _ = buckets.detrex_pixels_per_image(hw, COCO, seed=2)
  s = buckets.make_schedule(COCO.canvases, COCO.train_scales, COCO.scale_buckets,
                            COCO.group_bounds, buckets.group_shares(hw, COCO, COCO.group_bounds),
                            0)
  stats = buckets.bucketed_canvas_stats(hw, COCO, s, seed=3)
  assert len(set(s.canvases)) <= 8
  assert stats.pixels_per_image <= 1.15 * detrex, (stats, detrex)
  assert stats.rescaled < 0.03
  # The old single 800x1333 / 1333x800 canvas pair, on the same images, was far above.
  old = buckets.make_schedule(((800, 1333), (1333, 800)), COCO.train_scales, None, (1.0,),
                              None, 0)
  assert buckets.bucketed_canvas_stats(hw, COCO, old, seed=3).pixels_per_image > 1.4 * detrex


def test_choose_train_canvases_meets_the_budget_on_another_mix():
  hw = buckets.size_mix_sample(OTHER_MIX, n=1500, seed=5)
  sb, canvases = buckets.choose_train_canvases(hw, COCO, 2, 0.01, group_bounds=(0.72, 1.0, 1.4))
  s = buckets.make_schedule(canvases, COCO.train_scales, sb, (0.72, 1.0, 1.4),
                            buckets.group_shares(hw, COCO, (0.72, 1.0, 1.4)), 0)
  detrex, _ = buckets.detrex_pixels_per_image(hw, COCO, seed=6)
  stats = buckets.bucketed_canvas_stats(buckets.size_mix_sample(OTHER_MIX, n=3000, seed=7), COCO,
                                        s, seed=8)
  assert len(canvases) <= 8 and stats.pixels_per_image <= 1.15 * detrex
  assert stats.rescaled <= 0.02


def test_eval_canvases_hold_every_image_with_little_padding():
  hw = buckets.size_mix_sample(n=2000, seed=9)
  chosen = buckets.choose_eval_canvases(hw, COCO)
  assert len(chosen) <= 6
  for canvases in (chosen, COCO.eval_canvases):
    padded, own, rescaled = buckets.eval_pixels_per_image(hw, COCO, canvases)
    assert rescaled == 0 and padded <= 1.1 * own
  old, own, _ = buckets.eval_pixels_per_image(hw, COCO, ((800, 1333), (1333, 800)))
  assert old > 1.15 * own


def test_a_single_canvas_needs_no_groups_or_buckets():
  c = common.get_data_config("coco")
  c.canvases = ((512, 512),)
  s = streams.train_schedule(DataConfig.from_config(c))
  assert s.num_groups == 1 and not s.scale_per_step and s.canvases == ((512, 512),)
  c.canvases = ((512, 512), (512, 512))
  c.canvas_weights = (1.0, 1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match="group-major"):
    streams.train_schedule(DataConfig.from_config(c))
