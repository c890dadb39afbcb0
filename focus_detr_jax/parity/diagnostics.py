"""Decoder diagnostics (not pass/fail stages): how much the decoder amplifies tiny changes of its
input, and the float32 rounding error of each side measured against our float64 model
(`check_parity.py --sensitivity`; decisions §8)."""

import numpy as np

from focus_detr_jax.parity.reference import (build_model, config_for_reference, float64_forward,
                                             forced_from, load_reference, make_batch, run_forward)


def _eval_setup(reference, config):
  """The eval batch, the record's forced indices and its encoder `memory`."""
  ref = reference["forward_eval"]
  images, pixel_valid, _ = make_batch(reference["inputs"])
  forced = forced_from(ref, config.model.num_encoder_layers)
  return ref, images, pixel_valid, forced, np.asarray(ref["memory"], np.float32)


def decoder_sensitivity(reference_dir, sigma: float = 1e-6, trials: int = 3, seed: int = 0):
  """Rows (name, max abs error): the decoder outputs with every index and the encoder `memory`
  forced to the reference's, against the reference; then the change of ours when N(0, sigma^2)
  noise is added to that memory; then `float64_rounding_rows`. When a noise far below the
  reference's own thread-to-thread variation of `memory` (parity READMEs) moves the outputs by
  more than the decoder tolerance, that tolerance cannot be met reliably on that input.
  """
  reference = load_reference(reference_dir)
  config = config_for_reference(reference["meta"])
  ref, images, pixel_valid, forced, memory = _eval_setup(reference, config)
  model, variables = build_model(config, reference["dir"], train=False)
  keys = ("pred_logits", "pred_boxes")
  run = lambda m: run_forward(model, variables, images, pixel_valid, False,
                              dict(forced, memory=m))[0]
  outputs = run(memory)
  rows = [(f"memory forced to reference: {k} vs reference",
           float(np.abs(outputs[k] - ref[k]).max())) for k in keys]
  rng = np.random.default_rng(seed)
  for t in range(trials):
    perturbed = run(memory + rng.normal(scale=sigma, size=memory.shape).astype(np.float32))
    rows += [(f"memory + N(0, {sigma:g}) noise, trial {t}: change of our {k}",
              float(np.abs(perturbed[k] - outputs[k]).max())) for k in keys]
  return rows + float64_rounding_rows(reference, config, outputs)


def float64_rounding_rows(reference, config, outputs32=None):
  """The float32 rounding error of each side, with our float64 model (every index forced) as the
  exact value: |reference f32 - ours f64| next to |ours f32 - ours f64| per decoder output, with
  the reference's `memory` forced (the decoder alone; outputs32: ours in float32 so) and end to
  end. Returns rows (name, max abs difference).
  """
  ref, images, pixel_valid, forced, memory = _eval_setup(reference, config)
  if outputs32 is None:
    model, variables = build_model(config, reference["dir"], train=False)
    outputs32, _ = run_forward(model, variables, images, pixel_valid, False,
                               dict(forced, memory=memory))
  decoder64, _ = float64_forward(reference, config, images, pixel_valid,
                                 dict(forced, memory=memory.astype(np.float64)))
  full64, inter64 = float64_forward(reference, config, images, pixel_valid, forced)
  full64 = dict(full64, memory=inter64["memory"])
  rows = []
  for k in ("pred_logits", "pred_boxes", "inter_references"):
    rows += [(f"memory forced: |reference f32 - ours f64| {k}",
              float(np.abs(ref[k] - decoder64[k]).max())),
             (f"memory forced: |ours f32 - ours f64| {k}",
              float(np.abs(outputs32[k] - decoder64[k]).max()))]
  rows += [(f"end to end: |reference f32 - ours f64| {k}", float(np.abs(ref[k] - full64[k]).max()))
           for k in ("memory", "pred_logits", "pred_boxes", "inter_references")]
  return rows
