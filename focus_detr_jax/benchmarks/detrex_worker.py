"""The detrex side of `scripts/compare_detrex.py` and `profile_detrex.py`, under detrex's own
Python (torch, detectron2, detrex; no jax): `DETREX_PYTHON -m
focus_detr_jax.benchmarks.detrex_worker SPEC_JSON`, with this repository on PYTHONPATH
(`detrex.run_detrex`). The recorder imports torch after configuring the CPU threads.
"""

import contextlib
import functools
import json
import resource
import sys

import numpy as np

from focus_detr_jax import benchmarks
from focus_detr_jax.benchmarks import detrex_profile
from focus_detr_jax.reference import recorder


def detrex_worker(spec):
  """Times detrex's eval forward per size and (spec["train"]) one train step; prints
  `RESULT <json>` (medians, plus the process's peak RSS). With spec["profile"], one more train
  step runs under the torch profiler: `results["profile"]` is its per-part split
  (`detrex_profile.profile_step`)."""
  torch = recorder.configure_cpu(threads=spec["threads"], capability=None)
  model, _, dn_number = recorder.build_model(spec["config"], spec["detrex_root"])
  recorder.apply_weight_rule(model, recorder.manifest_rows(model), seed=0)
  rng = np.random.default_rng(0)
  results = {}
  # Two warm-up calls: after a single one, torch's first timed calls were 2-4x slower.
  timed = functools.partial(benchmarks.time_calls, warmup=2)

  with recorder.cpu_device_shim():
    for h, w in spec["eval_sizes"]:
      batch = [{"image": torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)).float(),
                "height": h, "width": w}]
      model.eval()

      def run_eval():
        with torch.no_grad():
          model(batch)
      results[f"eval {h}x{w} b1"] = timed(run_eval, repeats=spec["repeats"])
    if spec["train"]:
      # Imported here: torch (under detectron2) must load after `recorder.configure_cpu`.
      from detectron2.structures import Boxes, Instances
      h, w = spec["train_size"]
      batch = []
      for _ in range(spec["train_batch"]):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.from_numpy(recorder._gt_boxes(rng, h, w, spec["boxes"])))
        inst.gt_classes = torch.from_numpy(rng.integers(0, 80, spec["boxes"])).long()
        batch.append({"image": torch.from_numpy(
            rng.integers(0, 256, (3, h, w), dtype=np.uint8)).float(), "instances": inst})
      model.train()
      model.dn_number = dn_number

      def run_train(scope=lambda name: contextlib.nullcontext()):
        model.zero_grad(set_to_none=True)
        with scope("step:forward"):
          loss = sum(model(batch).values())
        with scope("step:backward"):
          loss.backward()
      results[f"train {h}x{w} b{spec['train_batch']}"] = timed(run_train, repeats=spec["repeats"])
      if spec.get("profile"):
        results["profile"] = detrex_profile.profile_step(torch, model, run_train)
  results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  benchmarks.print_result(results)


if __name__ == "__main__":
  detrex_worker(json.loads(sys.argv[1]))
