"""Every deformable attention formulation computes the same function (outputs and gradients).

The reference is the detrex/torch output stored in `ms_deform_attn.npz` (atol 1e-5, decisions §8);
the formulations are also compared with each other, on edge cases (samples off the map, on pixel
centres and borders, batch > 1) and in bfloat16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focus_detr_jax.models import deformable_attention as da

IMPLS = da.IMPLEMENTATIONS
ATOL = 1e-5


@pytest.fixture(scope="module")
def reference(r50_set):
  d = np.load(r50_set / "ms_deform_attn.npz")
  shapes = tuple((int(h), int(w)) for h, w in d["spatial_shapes"])
  return shapes, {k: d[k] for k in ("value", "sampling_locations", "attention_weights", "output")}


def _apply(impl, shapes, value, loc, weights):
  return jax.jit(lambda v, l, a: da.ms_deform_attn(v, shapes, l, a, implementation=impl))(
      value, loc, weights)


def _edge_case_inputs(batch=2, queries=37, heads=3, head_dim=8, points=3,
                      shapes=((7, 9), (4, 5), (2, 3), (1, 2)), seed=0):
  """Random inputs whose locations include off-map samples, pixel centres, borders, 0 and 1."""
  rng = np.random.default_rng(seed)
  n = sum(h * w for h, w in shapes)
  value = rng.normal(size=(batch, n, heads, head_dim)).astype(np.float32)
  loc = rng.uniform(-0.3, 1.3, size=(batch, queries, heads, len(shapes), points, 2))
  special = np.array([0.0, 1.0, 0.5, -0.5, 1.5, 1e-7, 1 - 1e-7])
  loc[:, :4] = rng.choice(special, size=loc[:, :4].shape)
  # Exact pixel centres and pixel borders of each level ((i + 0.5) / W and i / W).
  for l, (h, w) in enumerate(shapes):
    loc[:, 4:8, :, l, :, 0] = (rng.integers(0, w, size=loc[:, 4:8, :, l, :, 0].shape) + 0.5) / w
    loc[:, 4:8, :, l, :, 1] = rng.integers(-1, h + 2, size=loc[:, 4:8, :, l, :, 1].shape) / h
  logits = rng.normal(size=(batch, queries, heads, len(shapes) * points))
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  weights = weights.reshape(batch, queries, heads, len(shapes), points)
  return shapes, value, loc.astype(np.float32), weights.astype(np.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_stored_reference(reference, impl):
  shapes, d = reference
  out = _apply(impl, shapes, d["value"], d["sampling_locations"], d["attention_weights"])
  np.testing.assert_allclose(np.asarray(out), d["output"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_formulations_agree_on_edge_cases(impl):
  shapes, value, loc, weights = _edge_case_inputs()
  base = _apply("gather", shapes, value, loc, weights)
  out = _apply(impl, shapes, value, loc, weights)
  assert out.shape == (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
  np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=0, atol=ATOL)
  # Everything off the map samples zeros.
  far = np.full_like(loc, 2.5)
  np.testing.assert_array_equal(np.asarray(_apply(impl, shapes, value, far, weights)), 0.0)


def test_onehot_matmul_chunked_equals_unchunked(monkeypatch):
  shapes, value, loc, weights = _edge_case_inputs(queries=29)
  whole = _apply("onehot_matmul", shapes, value, loc, weights)
  # 2 images x 3 heads x 122 tokens per query: chunks of 5 queries, 29 = 5 x 5 + 4 (padding).
  monkeypatch.setattr(da, "ONEHOT_CHUNK_ELEMENTS", 5 * 2 * 3 * 122)
  chunked = _apply("onehot_matmul", shapes, value, loc, weights)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=0, atol=1e-6)


def _grads(impl, shapes, value, loc, weights, cotangent):
  def loss(v, l, a):
    return jnp.sum(da.ms_deform_attn(v, shapes, l, a, implementation=impl) * cotangent)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(value, loc, weights)


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "gather"])
@pytest.mark.parametrize("source", ["reference", "edge_cases"])
def test_gradients_agree(reference, impl, source):
  if source == "reference":
    shapes, d = reference
    value, loc, weights = d["value"], d["sampling_locations"], d["attention_weights"]
  else:
    shapes, value, loc, weights = _edge_case_inputs(seed=1)
    # Keep clear of integer pixel coordinates, where the bilinear weights have a kink.
    loc = loc + np.float32(1e-3)
  cot = np.random.default_rng(2).normal(
      size=(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])).astype(np.float32)
  base = _grads("gather", shapes, value, loc, weights, cot)
  got = _grads(impl, shapes, value, loc, weights, cot)
  for name, g, b in zip(("value", "locations", "weights"), got, base):
    g, b = np.asarray(g), np.asarray(b)
    assert g.shape == b.shape and np.all(np.isfinite(g)), name
    scale = max(np.abs(b).max(), 1.0)
    np.testing.assert_allclose(g, b, rtol=0, atol=1e-5 * scale, err_msg=f"d/d{name} ({impl})")


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_values(impl):
  shapes, value, loc, weights = _edge_case_inputs(seed=3)
  value = jnp.asarray(value, jnp.bfloat16)
  out = _apply(impl, shapes, value, loc, weights)
  assert out.dtype == jnp.bfloat16
  base = _apply("gather", shapes, value, loc, weights)
  # Same bf16 inputs, float32 sums: only the final rounding to bf16 may differ (1 ulp).
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(base, np.float32),
                             rtol=1e-2, atol=1e-2)


def test_dispatch_and_auto_choice(reference):
  assert da.resolve_implementation("auto", backend="cpu") == da.AUTO_IMPLEMENTATION["cpu"]
  assert da.resolve_implementation("auto", backend="unknown-backend") == "gather"
  for backend, impl in da.AUTO_IMPLEMENTATION.items():
    assert impl in IMPLS, backend
  with pytest.raises(ValueError, match="expected 'auto' or one of"):
    da.resolve_implementation("nope")
  shapes, d = reference
  args = (d["value"], d["sampling_locations"], d["attention_weights"])
  assert da.resolve_implementation("per_level") == "per_level"
  out = jax.jit(lambda v, l, a: da.ms_deform_attn(v, shapes, l, a, "per_level"))(*args)
  np.testing.assert_allclose(np.asarray(out), d["output"], rtol=0, atol=ATOL)


def test_model_takes_the_formulation_from_its_config(tiny_config):
  from focus_detr_jax.models.focus_detr import FocusDETR
  config = tiny_config.model.copy_and_resolve_references()
  config.msda_implementation = "per_level"
  model = FocusDETR.from_config(config)
  assert model.msda_implementation == "per_level"
  assert model != FocusDETR.from_config(tiny_config.model)     # another static jit argument
  config.msda_implementation = "nope"
  with pytest.raises(ValueError, match="unknown deformable attention implementation 'nope'"):
    FocusDETR.from_config(config)


def test_module_uses_selected_formulation(reference):
  """MultiScaleDeformableAttention gives the same output under every formulation."""
  shapes, _ = reference
  n = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(4)
  query = jnp.asarray(rng.normal(size=(2, 11, 32)), jnp.float32)
  value = jnp.asarray(rng.normal(size=(2, n, 32)), jnp.float32)
  ref = jnp.asarray(rng.uniform(size=(2, 11, 4, 4)), jnp.float32)
  module = da.MultiScaleDeformableAttention(embed_dim=32, num_heads=4)
  params = module.init(jax.random.PRNGKey(0), query, query, value, ref, shapes)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  outs = {}
  for impl in IMPLS:
    module = da.MultiScaleDeformableAttention(embed_dim=32, num_heads=4, implementation=impl)
    outs[impl] = np.asarray(jax.jit(lambda p: module.apply(p, query, query, value, ref,
                                                           shapes))(params))
  for impl in IMPLS:
    np.testing.assert_allclose(outs[impl], outs["gather"], rtol=0, atol=ATOL, err_msg=impl)


def test_auto_on_this_backend_matches_gather(reference):
  """What "auto" (the default the model and the parity tests use) picks here equals `gather`:
  forward to atol 1e-5 on the stored reference inputs and on edge cases, gradients close."""
  backend = jax.default_backend()
  picked = da.resolve_implementation("auto")
  assert picked == da.AUTO_IMPLEMENTATION.get(backend, "gather")
  assert da.resolve_implementation() == picked
  shapes, d = reference
  cases = [(shapes, d["value"], d["sampling_locations"], d["attention_weights"])]
  edge_shapes, value, loc, weights = _edge_case_inputs(seed=5)
  cases.append((edge_shapes, value, loc + np.float32(1e-3), weights))
  for shapes, value, loc, weights in cases:
    out = jax.jit(lambda v, l, a: da.ms_deform_attn(v, shapes, l, a))(value, loc, weights)
    base = _apply("gather", shapes, value, loc, weights)
    np.testing.assert_allclose(np.asarray(out), np.asarray(base), rtol=0, atol=ATOL)
    cot = np.random.default_rng(6).normal(size=out.shape).astype(np.float32)
    got = _grads("auto", shapes, value, loc, weights, cot)
    want = _grads("gather", shapes, value, loc, weights, cot)
    for name, g, b in zip(("value", "locations", "weights"), got, want):
      scale = max(np.abs(np.asarray(b)).max(), 1.0)
      np.testing.assert_allclose(np.asarray(g), np.asarray(b), rtol=0, atol=1e-5 * scale,
                                 err_msg=f"d/d{name} (auto = {picked})")
  np.testing.assert_allclose(
      np.asarray(_apply("auto", *cases[0])), d["output"], rtol=0, atol=ATOL)
