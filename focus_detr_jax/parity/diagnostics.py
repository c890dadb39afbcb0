"""Decoder diagnostics (not pass/fail stages): how much the decoder amplifies tiny changes of its
input, and the float32 rounding error of each side measured against our float64 model
(`check_parity.py --sensitivity`; decisions §8)."""

import numpy as np

from focus_detr_jax.parity.reference import (build_model, config_for_reference, float64_forward,
                                             forced_from, load_reference, make_batch, run_forward)


def decoder_sensitivity(reference_dir, sigma: float = 1e-6, trials: int = 3, seed: int = 0):
  """Diagnostic (not a pass/fail stage): how much the decoder amplifies tiny memory changes.

  Runs the eval forward with every index and the encoder `memory` forced to the reference's,
  then again with N(0, sigma^2) noise added to that memory. Returns rows (name, max abs error):
  the decoder outputs against the reference with the reference's own memory, and the change of
  our own outputs caused by the noise. When a noise far below the reference's own thread-to-thread
  variation of `memory` (parity READMEs) moves the outputs by more than the decoder tolerance,
  that tolerance cannot be met reliably on that input (decisions §8: such stages keep failing and
  the evidence goes to the notes).
  """
  reference = load_reference(reference_dir)
  config = config_for_reference(reference["meta"])
  ref = reference["forward_eval"]
  images, pixel_valid, _ = make_batch(reference["inputs"])
  model, variables = build_model(config, reference["dir"], train=False)
  forced = forced_from(ref, config.model.num_encoder_layers)
  memory = np.asarray(ref["memory"], np.float32)
  keys = ("pred_logits", "pred_boxes")
  outputs, _ = run_forward(model, variables, images, pixel_valid, False,
                           dict(forced, memory=memory))
  rows = [(f"memory forced to reference: {k} vs reference",
           float(np.abs(outputs[k] - ref[k]).max())) for k in keys]
  rng = np.random.default_rng(seed)
  for t in range(trials):
    noisy = memory + rng.normal(scale=sigma, size=memory.shape).astype(np.float32)
    perturbed, _ = run_forward(model, variables, images, pixel_valid, False,
                               dict(forced, memory=noisy))
    rows += [(f"memory + N(0, {sigma:g}) noise, trial {t}: change of our {k}",
              float(np.abs(perturbed[k] - outputs[k]).max())) for k in keys]
  rows += float64_rounding_rows(reference, config, outputs)
  return rows


def float64_rounding_rows(reference, config, outputs32=None):
  """Diagnostic: the float32 rounding error of each side, measured against float64.

  Runs our model with `model.dtype = "float64"` (under `jax.enable_x64`) on the reference's
  inputs, every index forced, twice: with the reference's own `memory` forced (the decoder alone)
  and end to end. With our float64 result as the exact value of the computation, the rows give
  |reference float32 - float64| (the reference's rounding error) next to
  |ours float32 - float64| (ours), per decoder output. Returns rows (name, max abs difference).
  """
  ref = reference["forward_eval"]
  images, pixel_valid, _ = make_batch(reference["inputs"])
  forced = forced_from(ref, config.model.num_encoder_layers)
  memory = np.asarray(ref["memory"], np.float32)
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
