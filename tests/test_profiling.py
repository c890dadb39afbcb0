"""focus_detr_jax/benchmarks/profiling.py: op-name classification, HLO metadata of a program."""

import jax
import jax.numpy as jnp

from focus_detr_jax.benchmarks import profiling


def test_classify_parts_and_directions():
  assert profiling.classify("jit(f)/jvp(FocusDETR)/backbone/res2_0/conv1/mul") == ("fwd",
                                                                                   "backbone")
  assert profiling.classify(
      "jit(f)/transpose(jvp(FocusDETR))/decoder_layers_3/attentions_1/add") == (
          "bwd", "decoder_layers_3")
  assert profiling.classify("jit(f)/jvp(FocusDETR)/encoder_layers_0/custom_bwd/mul") == (
      "bwd", "encoder_layers_0")
  assert profiling.classify("jit(f)/jvp(FocusDETR)/vmap(jit(_take))/gather") == (
      "fwd", "cascade gather")
  assert profiling.classify("jit(f)/jvp(losses)/matcher/vmap()/while/body/add") == (
      "fwd", "matcher")
  assert profiling.classify("jit(f)/jvp(denoising)/mul") == ("fwd", "denoising")


def test_hlo_metadata_names_fusions():
  def f(x, w):
    with jax.named_scope("backbone"):
      return jnp.sum(jnp.tanh(x @ w) * 2.0)

  x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  text = jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile().as_text()
  meta = profiling.hlo_metadata(text)
  assert meta and all(isinstance(v, str) for v in meta.values())
  assert any("transpose(" in op for op in meta.values())
  parts = {profiling.classify(op) for op in meta.values()}
  assert ("bwd", "other") in parts or ("fwd", "other") in parts
