"""Swin backbone: detectron2 parity (swin_tiny, swin_base_384), window logic, drop path, converter.

The parity sets live in `<repo>/../shared/parity` (override with FOCUS_DETR_PARITY_ROOT). Each
full-size forward is compiled once per session (module-scoped fixture); backbone tolerance is
rtol 1e-4 + atol 1e-4 (decisions §8).
"""

import functools
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focus_detr_jax.convert.detrex import (ConversionError, state_dict_to_variables,
                                           variables_to_state_dict)
from focus_detr_jax.convert.swin import swin_key_table, swin_key_to_path
from focus_detr_jax.models import swin
from focus_detr_jax.models.swin import SwinTransformer
from focus_detr_jax.parity.weights import build_state_dict, load_manifest

PARITY_ROOT = Path(os.environ.get("FOCUS_DETR_PARITY_ROOT",
                                  Path(__file__).resolve().parents[2] / "shared" / "parity"))
SETS = ("swin_tiny", "swin_base_384")
RTOL = ATOL = 1e-4


def _set_dir(name):
  d = PARITY_ROOT / name
  if not (d / "forward_eval.npz").exists():
    pytest.skip(f"parity set {d} not found")
  return d


@functools.lru_cache(maxsize=None)
def _load_set(name):
  """(model, state_dict, manifest, inputs, reference) of one recorded set."""
  d = _set_dir(name)
  cfg = json.loads((d / "meta.json").read_text())["swin"]
  model = SwinTransformer(cfg["embed_dim"], tuple(cfg["depths"]), tuple(cfg["num_heads"]),
                          cfg["window_size"], cfg["mlp_ratio"], float(cfg["drop_path_max"]),
                          tuple(cfg["out_indices"]))
  inputs = dict(np.load(d / "inputs.npz"))
  state_dict = build_state_dict(d / "state_dict_manifest.json", int(inputs["seed"]))
  manifest = load_manifest(d / "state_dict_manifest.json")
  return model, state_dict, manifest, inputs, dict(np.load(d / "forward_eval.npz"))


def _model_shapes(model):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]


def _import(state_dict, model):
  """The `backbone.*` keys of a detrex state_dict -> params of `model`, by the production path
  (`convert/detrex.py` with the Swin mapper, as a detrex checkpoint is loaded)."""
  backbone = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
  variables, _ = state_dict_to_variables(backbone, {"params": {"backbone": _model_shapes(model)}},
                                         backbone_mapper=swin_key_to_path)
  return variables["params"]["backbone"]


def _export(params, model):
  """params of `model` -> its detrex `backbone.*` keys, by the production export direction."""
  return variables_to_state_dict({"params": {"backbone": params}}, swin_key_table(model),
                                 backbone_mapper=swin_key_to_path)


def _eval_batch(inputs):
  """Normalise each image, then zero-pad bottom/right to the batch max: [B, H, W, 3] float32."""
  sizes = inputs["image_sizes"]
  h, w = sizes.max(0)
  batch = np.zeros((len(sizes), h, w, 3), np.float32)
  for b in range(len(sizes)):
    img = inputs[f"image_{b}"].astype(np.float32)                    # [3, h_b, w_b]
    img = (img - inputs["pixel_mean"][:, None, None]) / inputs["pixel_std"][:, None, None]
    batch[b, :img.shape[1], :img.shape[2]] = img.transpose(1, 2, 0)
  return batch


@pytest.fixture(scope="module", params=SETS)
def parity_run(request):
  """One jitted eval forward per set: (reference arrays, our NHWC maps by reference name)."""
  model, state_dict, _, inputs, ref = _load_set(request.param)
  params = _import(state_dict, model)

  @jax.jit
  def forward(p, images):
    outs, state = model.apply({"params": p}, images, mutable=["intermediates"])
    it = state["intermediates"]
    maps = {f"p{i}": o for i, o in zip(model.out_indices, outs)}
    maps["patch_embed"] = it["patch_embed_out"][0]
    maps["stage0_block0"] = it["layers_0"]["block0"][0]
    maps["stage0_merged"] = it["stage0_merged"][0]
    for i in range(len(model.depths)):
      maps[f"stage{i}"] = it[f"stage{i}"][0]
    return maps

  maps = jax.device_get(forward(params, jnp.asarray(_eval_batch(inputs))))
  return request.param, ref, {k: np.asarray(v) for k, v in maps.items()}


def _ours_for(name, maps):
  """Our array matching reference array `backbone_<name>` (NHWC -> the stored NCHW slices)."""
  m = re.fullmatch(r"(.+)_(img0_ch(\d+)|chanmean|shape)", name)
  base, kind, step = m.group(1), m.group(2), m.group(3)
  x = maps[base]
  if kind == "shape":
    return np.array([x.shape[0], x.shape[3], x.shape[1], x.shape[2]], np.int64)
  if kind == "chanmean":
    return x.astype(np.float64).mean((1, 2))
  return x[0, :, :, ::int(step)].transpose(2, 0, 1)


def test_parity_backbone(parity_run):
  """Every stored `backbone_*` array at rtol 1e-4 + atol 1e-4 (shapes exact)."""
  set_name, ref, maps = parity_run
  names = sorted(k[len("backbone_"):] for k in ref if k.startswith("backbone_"))
  assert len(names) >= 20, names
  report, failures = [], []
  for name in names:
    want, got = ref["backbone_" + name], _ours_for(name, maps)
    if name.endswith("_shape"):
      assert np.array_equal(got, want), (set_name, name, got, want)
      continue
    assert got.shape == want.shape, (set_name, name, got.shape, want.shape)
    err = np.abs(got - want)
    report.append(f"{name}: max abs {err.max():.2e}")
    if not np.all(err <= ATOL + RTOL * np.abs(want)):
      failures.append(f"{name}: max abs {err.max():.3e}, "
                      f"worst err/tol {(err / (ATOL + RTOL * np.abs(want))).max():.2f}")
  print(f"\n{set_name}: " + "; ".join(report))
  assert not failures, f"{set_name}: " + "; ".join(failures)


def _random_params(module, *args, seed=0):
  """Random params of the right shapes without compiling `init` (eval_shape + numpy)."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, s):
    base = 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0
    return jnp.asarray(base + 0.2 * rng.normal(size=s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ----------------------------------------------------------------------------------------------
# Window logic.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [2, 7, 12])
def test_relative_position_index(window):
  idx = swin.relative_position_index(window)
  n, side = window * window, 2 * window - 1
  assert idx.shape == (n, n) and idx.dtype == np.int64
  expected = np.zeros((n, n), np.int64)
  for i in range(n):
    for j in range(n):
      dy = i // window - j // window
      dx = i % window - j % window
      expected[i, j] = (dy + window - 1) * side + (dx + window - 1)
  np.testing.assert_array_equal(idx, expected)
  assert idx.min() == 0 and idx.max() == side * side - 1
  assert len(np.unique(idx)) == side * side                 # every table row is used
  centre = (window - 1) * side + (window - 1)
  np.testing.assert_array_equal(np.diag(idx), centre)      # dy = dx = 0
  np.testing.assert_array_equal(idx + idx.T, 2 * centre)   # (dy, dx) -> (-dy, -dx)


def test_relative_position_index_matches_recorded_buffers():
  for name in SETS:
    model, state_dict, _, _, _ = _load_set(name)
    keys = [k for k in state_dict if k.endswith(".attn.relative_position_index")]
    assert len(keys) == sum(model.depths)
    for k in keys:
      np.testing.assert_array_equal(state_dict[k], swin.relative_position_index(model.window_size))


def _brute_force_mask(hp, wp, window, shift):
  """Region of each padded pixel from the three slices per axis, then pairwise per window."""
  def region(v, size):
    return 0 if v < size - window else (1 if v < size - shift else 2)
  nw = (hp // window) * (wp // window)
  mask = np.zeros((nw, window * window, window * window), np.float32)
  for r in range(hp // window):
    for c in range(wp // window):
      ids = [region(r * window + a, hp) * 3 + region(c * window + b, wp)
             for a in range(window) for b in range(window)]
      k = r * (wp // window) + c
      for i in range(window * window):
        for j in range(window * window):
          mask[k, i, j] = 0.0 if ids[i] == ids[j] else -100.0
  return mask


@pytest.mark.parametrize("hp,wp,window,shift", [(14, 21, 7, 3), (91, 119, 7, 3), (12, 24, 12, 6),
                                                (24, 36, 12, 6), (7, 7, 7, 3)])
def test_shift_attention_mask(hp, wp, window, shift):
  mask = swin.shift_attention_mask(hp, wp, window, shift)
  nr, nc = hp // window, wp // window
  assert mask.shape == (nr * nc, window * window, window * window) and mask.dtype == np.float32
  assert set(np.unique(mask)) <= {0.0, -100.0}
  np.testing.assert_array_equal(mask, _brute_force_mask(hp, wp, window, shift))
  np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))
  # Only the last window row / column mixes regions; every other window is unmasked.
  grid = mask.reshape(nr, nc, -1)
  assert not grid[:-1, :-1].any()
  corner = grid[-1, -1].reshape(window * window, window * window)
  # The bottom-right window holds 4 regions: 4 blocks of (window-shift or shift)^2 tokens.
  sizes = [(window - shift) ** 2, (window - shift) * shift, shift * (window - shift), shift ** 2]
  assert (corner == 0).sum() == sum(s * s for s in sizes)
  if nr == 1:
    # Map smaller than / equal to one window row (Swin-B stage 3): detectron2 still masks.
    assert grid[0, 0].any()


def test_window_partition_order_and_round_trip():
  b, hp, wp, c, w = 2, 14, 21, 3, 7
  x = np.random.default_rng(0).normal(size=(b, hp, wp, c)).astype(np.float32)
  win = np.asarray(swin.window_partition(jnp.asarray(x), w))
  assert win.shape == (b, (hp // w) * (wp // w), w * w, c)
  for r in range(hp // w):
    for col in range(wp // w):
      k = r * (wp // w) + col
      for a in range(w):
        for bb in range(w):
          np.testing.assert_array_equal(win[:, k, a * w + bb], x[:, r * w + a, col * w + bb])
  np.testing.assert_array_equal(np.asarray(swin.window_reverse(jnp.asarray(win), w, hp, wp)), x)


def test_padding_helpers():
  assert [swin.padded_size(s, 7) for s in (1, 7, 8, 85, 117)] == [7, 7, 14, 91, 119]
  assert [swin.padded_size(s, 12) for s in (11, 12, 43, 59)] == [12, 12, 48, 60]
  x = jnp.ones((1, 3, 5, 2))
  y = np.asarray(swin.pad_bottom_right(x, 7, 7))
  assert y.shape == (1, 7, 7, 2)
  assert (y[:, :3, :5] == 1).all() and (y[:, 3:] == 0).all() and (y[:, :, 5:] == 0).all()


@pytest.mark.parametrize("shift", [0, 3])
def test_block_window_padding_is_zero_tokens_bottom_right(shift):
  """A block on a 9x10 map equals the block on the same map explicitly zero-extended to 14x14.

  With norm1's bias at zero, explicit zero tokens stay zero after norm1, exactly like detectron2's
  window padding: padded tokens are unmasked keys/values at the bottom/right, and the shift and its
  mask act on the padded grid. Fails if padding were masked, top/left, or applied after the roll.
  """
  w, c = 7, 8
  block = swin.SwinBlock(num_heads=2, window=w, shift=shift)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, 10, c)).astype(np.float32))
  mask = swin.shift_attention_mask(14, 14, w, 3)
  params = _random_params(block, x, mask)
  params["norm1"]["bias"] = jnp.zeros_like(params["norm1"]["bias"])
  apply = jax.jit(lambda p, v: block.apply({"params": p}, v, mask))
  small = apply(params, x)
  big = apply(params, swin.pad_bottom_right(x, 14, 14))
  np.testing.assert_allclose(np.asarray(small), np.asarray(big)[:, :9, :10], rtol=1e-5, atol=1e-5)
  # Padding at the top/left instead changes the result.
  shifted_pad = jnp.pad(x, ((0, 0), (5, 0), (4, 0), (0, 0)))
  other = apply(params, shifted_pad)[:, 5:, 4:]
  assert np.abs(np.asarray(other) - np.asarray(small)).max() > 1e-3


def test_patch_merging_order_and_odd_padding():
  b, h, w, c = 1, 5, 7, 2
  x = np.arange(b * h * w * c, dtype=np.float32).reshape(b, h, w, c) + 1.0
  y = np.asarray(swin.patch_merging_concat(jnp.asarray(x)))
  assert y.shape == (b, 3, 4, 4 * c)
  xp = np.zeros((b, 6, 8, c), np.float32)
  xp[:, :h, :w] = x
  for i in range(3):
    for j in range(4):
      # (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col)
      np.testing.assert_array_equal(y[0, i, j, 0:c], xp[0, 2 * i, 2 * j])
      np.testing.assert_array_equal(y[0, i, j, c:2 * c], xp[0, 2 * i + 1, 2 * j])
      np.testing.assert_array_equal(y[0, i, j, 2 * c:3 * c], xp[0, 2 * i, 2 * j + 1])
      np.testing.assert_array_equal(y[0, i, j, 3 * c:], xp[0, 2 * i + 1, 2 * j + 1])
  assert (y[0, 2, :, c:2 * c] == 0).all() and (y[0, :, 3, 2 * c:3 * c] == 0).all()


# ----------------------------------------------------------------------------------------------
# Tiny model: shapes, train mode.
# ----------------------------------------------------------------------------------------------

TINY = dict(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)


def test_tiny_shapes_any_size():
  model = SwinTransformer(**TINY, drop_path_rate=0.0)
  x = jnp.zeros((1, 37, 51, 3))
  outs, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x)
  assert [o.shape for o in outs] == [(1, 5, 7, 16), (1, 3, 4, 32), (1, 2, 2, 64)]
  assert set(variables) == {"params"}                       # the index is no variable
  assert set(variables["params"]) == {"patch_embed", "layers_0", "layers_1", "layers_2",
                                      "layers_3", "norm1", "norm2", "norm3"}
  assert "downsample" not in variables["params"]["layers_3"]
  table = variables["params"]["layers_2"]["blocks_1"]["attn"]["relative_position_bias_table"]
  assert table.shape == (49, 2)
  outs = jax.eval_shape(SwinTransformer(**TINY, out_indices=(0, 1, 2, 3)).init_with_output,
                        jax.random.PRNGKey(0), x)[0]
  assert [o.shape for o in outs] == [(1, 10, 13, 8), (1, 5, 7, 16), (1, 3, 4, 32), (1, 2, 2, 64)]
  outs, variables = jax.eval_shape(SwinTransformer(**TINY, dtype=jnp.bfloat16).init_with_output,
                                   jax.random.PRNGKey(0), x)
  assert all(o.dtype == jnp.bfloat16 for o in outs)
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))


def test_drop_path_module():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 3, 5)).astype(np.float32))
  key = {"dropout": jax.random.PRNGKey(3)}
  np.testing.assert_array_equal(swin.DropPath(0.5).apply({}, x, False, rngs=key), x)
  np.testing.assert_array_equal(swin.DropPath(0.0).apply({}, x, True, rngs=key), x)
  y = np.asarray(swin.DropPath(0.5).apply({}, x, True, rngs=key))
  kept = np.all(y == np.asarray(x) / 0.5, axis=(1, 2))
  dropped = np.all(y == 0, axis=(1, 2))
  assert np.all(kept | dropped) and 10 < kept.sum() < 54     # whole samples, about half kept


def test_train_drop_path_under_jit():
  """Tiny model: the train forward (drop path 0.5, 'dropout' rng) jits and differs from eval."""
  model = SwinTransformer(**TINY, drop_path_rate=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 40, 52, 3)).astype(np.float32))
  variables = {"params": _random_params(model, x)}

  @functools.partial(jax.jit, static_argnames="train")
  def run(v, images, key, train):
    return model.apply(v, images, train=train, rngs={"dropout": key})

  ev = run(variables, x, jax.random.PRNGKey(0), train=False)
  tr1 = run(variables, x, jax.random.PRNGKey(1), train=True)
  tr1b = run(variables, x, jax.random.PRNGKey(1), train=True)
  tr2 = run(variables, x, jax.random.PRNGKey(2), train=True)
  for a, b_, c_, e in zip(tr1, tr1b, tr2, ev):
    assert a.shape == e.shape and np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))      # same key, same result
    assert np.abs(np.asarray(a) - np.asarray(e)).max() > 1e-3         # train differs from eval
    assert np.abs(np.asarray(a) - np.asarray(c_)).max() > 1e-3        # different key differs


def test_drop_path_rates():
  np.testing.assert_allclose(swin.drop_path_rates(0.1, (2, 2, 6, 2)), np.linspace(0, 0.1, 12))
  assert swin.drop_path_rates(0.2, (2, 2, 18, 2))[-1] == pytest.approx(0.2)


# ----------------------------------------------------------------------------------------------
# Converter.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SETS)
def test_converter_round_trip_bitwise(name):
  model, state_dict, manifest, _, _ = _load_set(name)
  backbone = [(k, tuple(s)) for k, s, *_ in manifest if k.startswith("backbone.")]
  table = swin_key_table(model)
  assert [(k, v[2]) for k, v in table.items()] == backbone          # keys, order and shapes
  params = _import(state_dict, model)
  shapes = _model_shapes(model)
  assert (jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(shapes))
  for (path, a), (_, s) in zip(jax.tree_util.tree_leaves_with_path(params),
                               jax.tree_util.tree_leaves_with_path(shapes)):
    assert a.shape == s.shape and a.dtype == s.dtype, path
  back = _export(params, model)
  assert list(back) == [k for k, _ in backbone]
  for k, v in back.items():
    assert v.dtype == state_dict[k].dtype and v.shape == state_dict[k].shape, k
    assert np.array_equal(v, state_dict[k]), k
    assert v.tobytes() == np.ascontiguousarray(state_dict[k]).tobytes(), k
  # Name-based mapping (the `backbone_mapper` hook of convert/detrex.py) agrees with the table.
  for k, (path, kind, _) in table.items():
    rule = swin_key_to_path(k)
    if path is None:
      assert rule is None and kind == "index"
    else:
      assert rule == ("params", ("backbone",) + path[:-1], kind, path[-1]), k
  assert swin_key_to_path("neck.convs.0.conv.weight") is None


def test_converter_errors_name_each_bad_key():
  model, state_dict, _, _, _ = _load_set("swin_tiny")
  sd = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
  bad = dict(sd)
  del bad["backbone.layers.1.blocks.0.mlp.fc2.bias"]
  del bad["backbone.norm2.weight"]
  bad["backbone.layers.4.blocks.0.norm1.weight"] = np.ones(3, np.float32)
  bad["backbone.layers.0.blocks.1.attn.qkv.weight"] = sd[
      "backbone.layers.0.blocks.1.attn.qkv.weight"].T
  idx = sd["backbone.layers.2.blocks.3.attn.relative_position_index"].copy()
  idx[0, 1] += 1
  bad["backbone.layers.2.blocks.3.attn.relative_position_index"] = idx
  with pytest.raises(ConversionError) as e:
    _import(bad, model)
  msg = str(e.value)
  # A missing key is named by the variable it leaves empty; the others by their key.
  for name in ("params/backbone/layers_1/blocks_0/mlp/fc2/bias", "params/backbone/norm2/scale",
               "backbone.layers.4.blocks.0.norm1.weight",
               "backbone.layers.0.blocks.1.attn.qkv.weight",
               "backbone.layers.2.blocks.3.attn.relative_position_index: relative_position_index "
               "differs from the formula"):
    assert name in msg, (name, msg)
  assert "1 unexpected" in msg and "2 mis-shaped" in msg             # qkv and the index
  assert "3 model variables have no key" in msg                    # 2 deleted + the qkv kernel

  # Weights of window 7 loaded into a window-12 model: tables and indices named, with windows.
  with pytest.raises(ConversionError) as e:
    _import(sd, model.clone(window_size=12))
  msg = str(e.value)
  assert "backbone.layers.0.blocks.0.attn.relative_position_bias_table: (169, 3)" in msg
  assert ("backbone.layers.3.blocks.1.attn.relative_position_index: shape (49, 49), expected "
          "(144, 144) for window_size=12; [49, 49] is window 7") in msg

  # Export direction: a parameter the key list needs and the variables lack is a KeyError
  # (`convert/to_detrex.py` turns it into a ConversionError).
  params = _import(sd, model)
  del params["layers_1"]["downsample"]["reduction"]
  with pytest.raises(KeyError, match="reduction"):
    _export(params, model)
