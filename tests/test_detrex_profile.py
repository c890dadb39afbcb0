"""focus_detr_jax/benchmarks/detrex_profile.py: per-part attribution of a torch profile, on
synthetic events (no torch needed)."""

import os

import pytest

from focus_detr_jax.benchmarks import detrex_profile

NODE = detrex_profile.BACKWARD_NODE


def _events():
  """A tiny train step on thread 1 (times in us), plus a forward on thread 2 reusing seq 0."""
  rows = [  # name, start, end, parent index, seq, fwd_thread
      ("step:forward", 0, 100, None, -1, 0),                 # 0
      ("part:backbone", 0, 40, 0, -1, 0),                    # 1
      ("aten::conv", 5, 35, 1, 0, 0),                        # 2 creates node 0
      ("aten::mkldnn", 10, 30, 2, -1, 0),                    # 3 below autograd
      ("aten::ne", 36, 38, 1, 1, 0),                         # 4 no node: records next seq 1
      ("part:neck", 40, 60, 0, -1, 0),                       # 5
      ("aten::linear", 45, 55, 5, 1, 0),                     # 6 creates node 1
      ("part:losses", 60, 95, 0, -1, 0),                     # 7
      ("part:matcher", 65, 80, 7, -1, 0),                    # 8 nested: innermost wins
      ("aten::cdist", 66, 79, 8, -1, 0),                     # 9 no grad
      ("aten::l1", 82, 90, 7, 2, 0),                         # 10 creates node 2
      ("step:backward", 100, 200, None, -1, 0),              # 11
      (NODE + " L1Backward0", 101, 111, 11, 2, 1),           # 12
      ("aten::sign", 102, 110, 12, -1, 0),                   # 13
      (NODE + " LinearBackward0", 112, 132, 11, 1, 1),       # 14 -> neck (last with seq 1)
      (NODE + " ConvBackward0", 133, 173, 11, 0, 1),         # 15 -> backbone, not thread 2's
      (NODE + " torch::autograd::AccumulateGrad", 174, 180, 11, -1, 0),   # 16 -> other
      (NODE + " CopySlices", 181, 185, 11, 3, 1),            # 17 made by aten::l1 (seq 2)
      (NODE + " OrphanBackward0", 186, 189, 11, 0, 3),       # 18 no forward thread 3: other
  ]
  events = [dict(name=n, thread=1, start_us=s, end_us=e, parent=p, seq=q, fwd_thread=f)
            for n, s, e, p, q, f in rows]
  events.append(dict(name="part:heads", thread=2, start_us=0, end_us=3, parent=None, seq=-1,
                     fwd_thread=0))
  events.append(dict(name="aten::mm", thread=2, start_us=1, end_us=2, parent=19, seq=0,
                     fwd_thread=0))
  return events


def test_attribute_parts_and_directions():
  out = detrex_profile.attribute(_events())
  expected_us = {"fwd other": 5, "fwd backbone": 40, "fwd neck": 20, "fwd losses": 20,
                 "fwd matcher": 15, "fwd heads": 3, "bwd losses": 10 + 4, "bwd neck": 20,
                 "bwd backbone": 40, "bwd other": 17 + 6 + 3}
  assert out["seconds"] == pytest.approx({k: v * 1e-6 for k, v in expected_us.items()})
  assert out["total_s"] == pytest.approx(203e-6)   # the roots' durations: nothing twice
  assert out["nearest_bwd_s"] == pytest.approx(4e-6)
  assert out["unmatched_bwd_s"] == pytest.approx(3e-6)
  assert out["thread_s"] == pytest.approx({"1": 200e-6, "2": 3e-6})


def test_grouped_folds_layers_and_ours_runtime():
  g = detrex_profile.grouped({"fwd encoder_layers_0": 1.0, "fwd encoder_layers_5": 2.0,
                              "bwd decoder_layers_1": 0.5, "bwd cascade gather": 0.25,
                              "bwd cascade scatter": 0.25, "- runtime": 0.1, "fwd other": 0.2})
  assert g[("fwd", "encoder layers")] == 3.0
  assert g[("bwd", "decoder layers")] == 0.5
  assert g[("bwd", "cascade gather/scatter")] == 0.5
  assert g[("fwd", "other")] == pytest.approx(0.3)


def test_markdown_totals():
  detrex = dict(seconds={"fwd backbone": 1.0, "bwd backbone": 2.0, "fwd encoder_layers_0": 0.5},
                total_s=3.5, nearest_bwd_s=0.0, unmatched_bwd_s=0.0, thread_s={"1": 3.5},
                profiled_step_s=3.6)
  ours = dict(wall_by_part={"fwd backbone": 0.5, "bwd model other": 1.5}, idle_s=0.25)
  md = detrex_profile.markdown(detrex, ours)
  assert "| backbone | 1.00 | 2.00 | 0.50 | 0.00 |" in md
  assert "| **parts total** | **1.50** | **2.00** | **0.50** | **1.50** |" in md
  assert "| **step (fwd + bwd + idle)** | **3.50** | | **2.25** | |" in md
  assert "| encoder_layers_0 | 0.500 | 0.000 | 0.000 | 0.000 |" in md
  assert detrex_profile.markdown(detrex).splitlines()[1] == "|---|---|---|"   # without ours


def test_detrex_worker_gets_our_source_and_the_detrex_checkout_on_its_path(monkeypatch, tmp_path):
  """The worker imports our package (not installed in detrex's environment) and detrex's
  projects/ folder (not installed by detrex): both come from its PYTHONPATH."""
  import types
  from focus_detr_jax import benchmarks
  from focus_detr_jax.benchmarks import detrex
  seen = {}

  def fake_worker(command, timeout, cwd, env):
    seen.update(command=command, env=env)
    return {"ok": 1}, None

  monkeypatch.setattr(benchmarks, "run_worker", fake_worker)
  args = types.SimpleNamespace(detrex_python="/opt/ref/bin/python", detrex_root=str(tmp_path),
                               timeout=5, threads=2)
  assert detrex.run_detrex(args, {"task": "eval"}) == {"ok": 1}
  assert seen["command"][0] == "/opt/ref/bin/python"
  assert seen["env"]["PYTHONPATH"].split(os.pathsep) == [detrex.SOURCE_ROOT, str(tmp_path)]
