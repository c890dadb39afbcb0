"""Weight file formats without torch: the restricted reader and the backbone importers.

Fixtures are written here in each real key layout (random arrays, real names and shapes): torch
zip and legacy `.pth` files by a small pure-Python writer of torch's format (no torch needed),
detectron2 `.pkl` as `tools/convert-torchvision-to-d2.py` writes them, the official Swin layout
from the recorded Swin-T manifest, and Caffe2 blob names.
"""

import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from conftest import import_script
from focus_detr_jax.convert import backbones, torch_io
from focus_detr_jax.convert.detrex import ConversionError
from focus_detr_jax.convert.init import flatten, model_shapes
from focus_detr_jax.models.focus_detr import BackboneConfig, FocusDETR
from focus_detr_jax.models.swin import relative_position_index

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# A pure-Python writer of torch's file formats (what torch.save does, spec'd by
# torch/serialization.py): tensors pickle as torch._utils._rebuild_tensor_v2 over storages
# named by persistent ids.
# ------------------------------------------------------------------------------------------------

_STORAGE_NAMES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
                  np.dtype("float16"): "HalfStorage",
                  np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
                  np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
                  np.dtype("uint8"): "ByteStorage", np.dtype("bool"): "BoolStorage"}


class _Global:
  """Written as a GLOBAL opcode `module\\nname` (the module need not exist here)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise AssertionError("never called")


class TensorView:
  """A tensor that views `base`'s storage with an offset and strides (in elements)."""

  def __init__(self, base, offset, shape, stride):
    self.base, self.offset, self.shape, self.stride = base, offset, shape, stride


class _StorageRef:
  def __init__(self, key, array):
    self.key, self.array = key, array


class _Tensor:
  def __init__(self, storage, offset, shape, stride):
    self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

  def __reduce__(self):
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            (self.storage, self.offset, tuple(self.shape), tuple(self.stride), False,
             collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):
  dispatch = dict(pickle._Pickler.dispatch)

  def __init__(self, file, legacy):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      pid = ("storage", _Global("torch", _STORAGE_NAMES[obj.array.dtype]), obj.key, "cpu",
             obj.array.size)
      return pid + (None,) if self.legacy else pid
    return None


def _save_global(self, obj):
  self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
  self.memoize(obj)


_TorchPickler.dispatch[_Global] = _save_global


def _tensors(obj, storages):
  """Replace arrays by `_Tensor`s over numbered storages (views share their base's storage)."""

  def storage_of(array):
    if id(array) not in storages:
      storages[id(array)] = _StorageRef(str(len(storages)), np.ascontiguousarray(array))
    return storages[id(array)]

  if isinstance(obj, TensorView):
    return _Tensor(storage_of(obj.base), obj.offset, obj.shape, obj.stride)
  if isinstance(obj, np.ndarray):
    strides = [s // obj.itemsize for s in np.array(obj, order="C").strides]
    return _Tensor(storage_of(obj), 0, obj.shape, strides)
  if isinstance(obj, dict):
    return type(obj)((k, _tensors(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_tensors(v, storages) for v in obj)
  return obj


def write_torch_file(path, obj, legacy=False, byteorder="little"):
  """torch.save(obj, path) for numpy arrays: zip format (torch >= 1.6) or the legacy format."""
  storages = {}
  tree = _tensors(obj, storages)
  buf = io.BytesIO()
  _TorchPickler(buf, legacy).dump(tree)
  refs = list(storages.values())
  if legacy:
    with open(path, "wb") as f:
      for head in (torch_io.TORCH_LEGACY_MAGIC, torch_io.TORCH_LEGACY_PROTOCOL,
                   {"protocol_version": 1001, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 8}}):
        pickle.dump(head, f, protocol=2)
      f.write(buf.getvalue())
      pickle.dump(sorted(r.key for r in refs), f, protocol=2)
      for r in sorted(refs, key=lambda r: r.key):
        f.write(struct.pack("<q", r.array.size) + r.array.tobytes())
    return path
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", buf.getvalue())
    zf.writestr("archive/byteorder", byteorder)
    for r in refs:
      data = r.array
      if byteorder == "big" and data.dtype.itemsize > 1:
        data = data.view(f"<u{data.dtype.itemsize}").astype(f">u{data.dtype.itemsize}")
      zf.writestr(f"archive/data/{r.key}", data.tobytes())
    zf.writestr("archive/version", "3\n")
  return path


# ------------------------------------------------------------------------------------------------
# Key layouts
# ------------------------------------------------------------------------------------------------


def torchvision_resnet(depth=50, width=64, seed=0, counters=True):
  """torchvision ResNet state dict (names, shapes, order of `resnet50().state_dict()`)."""
  rng = np.random.default_rng(seed)
  blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
  sd = {}

  def conv(name, shape):
    sd[name] = rng.normal(0, 0.1, shape).astype(np.float32)

  def bn(name, c):
    sd[f"{name}.weight"] = rng.normal(1, 0.1, c).astype(np.float32)
    sd[f"{name}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    if counters:
      sd[f"{name}.num_batches_tracked"] = np.array(1000, np.int64)

  conv("conv1.weight", (width, 3, 7, 7))
  bn("bn1", width)
  inplanes = width
  for i, n in enumerate(blocks):
    planes = width * 2 ** i
    for b in range(n):
      p = f"layer{i + 1}.{b}"
      conv(f"{p}.conv1.weight", (planes, inplanes, 1, 1))
      bn(f"{p}.bn1", planes)
      conv(f"{p}.conv2.weight", (planes, planes, 3, 3))
      bn(f"{p}.bn2", planes)
      conv(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))
      bn(f"{p}.bn3", planes * 4)
      if b == 0:
        conv(f"{p}.downsample.0.weight", (planes * 4, inplanes, 1, 1))
        bn(f"{p}.downsample.1", planes * 4)
      inplanes = planes * 4
  conv("fc.weight", (1000, inplanes))
  sd["fc.bias"] = rng.normal(0, 0.1, 1000).astype(np.float32)
  return sd


def torchvision_to_d2(sd):
  """detectron2 tools/convert-torchvision-to-d2.py, verbatim renaming rules."""
  new = {}
  for k, v in sd.items():
    old = k
    if "layer" not in k:
      k = "stem." + k
    for t in [1, 2, 3, 4]:
      k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in [1, 2, 3]:
      k = k.replace(f"bn{t}", f"conv{t}.norm")
    k = k.replace("downsample.0", "shortcut")
    k = k.replace("downsample.1", "shortcut.norm")
    new[k] = sd[old]
  return {"model": new, "__author__": "torchvision", "matching_heuristics": True}


def official_swin(manifest_path, seed=0, window=7, table_window=None):
  """The official Swin checkpoint layout of the recorded detrex Swin backbone: same names without
  `backbone.`, no output norms norm1..3, plus the classifier `norm`/`head` and `attn_mask`."""
  rng = np.random.default_rng(seed)
  sd = {}
  manifest = json.loads(Path(manifest_path).read_text())
  tw = table_window or window
  for key, shape, _, _, _ in manifest:
    if not key.startswith("backbone."):
      continue
    name = key[len("backbone."):]
    if name.split(".")[0] in ("norm1", "norm2", "norm3"):
      continue
    if name.endswith("relative_position_index"):
      sd[name] = relative_position_index(tw)
      continue
    if name.endswith("relative_position_bias_table"):
      shape = [(2 * tw - 1) ** 2, shape[1]]
    sd[name] = rng.normal(0, 0.1, shape).astype(np.float32)
    m = name.split(".")
    if name.endswith("norm2.bias") and m[0] == "layers" and int(m[3]) % 2 == 1 and int(m[1]) < 3:
      sd[".".join(m[:4]) + ".attn_mask"] = np.zeros((64, window * window, window * window),
                                                     np.float32)
  sd["norm.weight"] = np.ones(768, np.float32)
  sd["norm.bias"] = np.zeros(768, np.float32)
  sd["head.weight"] = rng.normal(0, 0.1, (1000, 768)).astype(np.float32)
  sd["head.bias"] = np.zeros(1000, np.float32)
  return {"model": sd}


CAFFE2 = {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "res_conv1_bn_s": np.ones(64, np.float32),
          "res_conv1_bn_b": np.zeros(64, np.float32),
          "res2_0_branch2a_w": np.zeros((64, 64, 1, 1), np.float32),
          "res2_0_branch2a_bn_s": np.ones(64, np.float32), "fc1000_w": np.zeros((1000, 2048))}


# ------------------------------------------------------------------------------------------------
# The reader
# ------------------------------------------------------------------------------------------------


def _sample_tree():
  rng = np.random.default_rng(1)
  base = rng.normal(size=(4, 6)).astype(np.float32)
  sd = collections.OrderedDict([
      ("w32", rng.normal(size=(3, 5, 2, 2)).astype(np.float32)),
      ("w16", rng.normal(size=(7,)).astype(np.float16)),
      ("wbf16", rng.normal(size=(2, 3)).astype(ml_dtypes.bfloat16)),
      ("i64", np.arange(12, dtype=np.int64).reshape(3, 4)),
      ("mask", np.array([True, False, True])),
      ("scalar", np.array(2.5, np.float32)),
      ("empty", np.zeros((0, 4), np.float32)),
      ("base", base),
      ("transposed", TensorView(base, 0, (6, 4), (1, 6))),     # base.T, shares the storage
      ("row2", TensorView(base, 12, (6,), (1,))),              # base[2], offset view
  ])
  expected = {k: (v if isinstance(v, np.ndarray) else None) for k, v in sd.items()}
  expected["transposed"] = base.T
  expected["row2"] = base[2]
  return {"model": sd, "iteration": 7, "meta": {"lr": [0.1, 0.01]}}, expected


@pytest.mark.parametrize("legacy,byteorder", [(False, "little"), (False, "big"), (True, "little")])
def test_torch_files_read_without_torch(tmp_path, legacy, byteorder):
  tree, expected = _sample_tree()
  path = write_torch_file(tmp_path / "w.pth", tree, legacy=legacy, byteorder=byteorder)
  loaded = torch_io.load_file(path, backend="numpy")
  assert loaded["iteration"] == 7 and loaded["meta"] == {"lr": [0.1, 0.01]}
  assert list(loaded["model"]) == list(expected)
  for k, want in expected.items():
    got = loaded["model"][k]
    assert got.dtype == want.dtype and got.shape == want.shape, k
    np.testing.assert_array_equal(got, want, err_msg=k)


def test_plain_pickles_and_npz(tmp_path):
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
  for protocol in (2, 5):
    p = tmp_path / f"p{protocol}.pkl"
    p.write_bytes(pickle.dumps({"model": arrays, "__author__": "x"}, protocol=protocol))
    got = torch_io.load_file(p)
    assert got["__author__"] == "x"
    for k in arrays:
      np.testing.assert_array_equal(got["model"][k], arrays[k])
  np.savez(tmp_path / "w.npz", **arrays)
  got = torch_io.load_file(tmp_path / "w.npz")
  assert list(got) == ["a", "b"] and np.array_equal(got["a"], arrays["a"])


class _Evil:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"echo pwned > {self.path}",))


class SGD:   # stands for an optimizer object pickled into a training checkpoint
  def __init__(self):
    self.lr = 0.1


def test_unpickler_rejects_code_and_names_it(tmp_path):
  marker = tmp_path / "pwned"
  p = tmp_path / "evil.pkl"
  p.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "x": _Evil(marker)}, protocol=2))
  with pytest.raises(torch_io.UnsafePickleError) as err:
    torch_io.load_file(p)
  assert not marker.exists(), "the pickle's code ran"
  assert "system" in str(err.value) and "['x']" in str(err.value)

  p2 = tmp_path / "ckpt.pkl"
  p2.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "optimizer": SGD()}, protocol=2))
  with pytest.raises(torch_io.UnsafePickleError, match=r"SGD at \['optimizer'\]"):
    torch_io.load_file(p2)

  p3 = tmp_path / "obj.pkl"
  p3.write_bytes(pickle.dumps({"w": np.array([{"a": 1}], dtype=object)}, protocol=2))
  with pytest.raises(torch_io.UnsafePickleError, match="object"):
    torch_io.load_file(p3)


def test_torch_zip_with_foreign_object_is_refused(tmp_path):
  tree = {"model": {"w": np.ones(3, np.float32)},
          "optimizer": _Global("torch.optim.sgd", "SGD")}
  path = write_torch_file(tmp_path / "ckpt.pth", tree)
  with pytest.raises(torch_io.UnsafePickleError) as err:
    torch_io.load_file(path, backend="numpy")
  assert "torch.optim.sgd.SGD" in str(err.value) and "weights_only=False" in str(err.value)


# ------------------------------------------------------------------------------------------------
# Importers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def r50_reference():
  from configs import focus_detr_r50_4scale_12ep
  config = focus_detr_r50_4scale_12ep.get_config()
  return config, flatten(model_shapes(FocusDETR.from_config(config.model)))


def _import(obj, fmt, config, reference, source="f"):
  sd, meta, top_rows = backbones.unwrap_state_dict(obj, source)
  backbone = BackboneConfig.from_config(config.model.backbone)
  loaded, rows, fmt = backbones.import_backbone(sd, fmt, reference, backbone, meta, source)
  return loaded, top_rows + rows, fmt


def test_torchvision_maps_every_key(tmp_path, r50_reference):
  config, reference = r50_reference
  sd = torchvision_resnet()
  path = write_torch_file(tmp_path / "resnet50.pth", sd)
  loaded, rows, fmt = _import(torch_io.load_file(path, backend="numpy"), "torchvision", config,
                              reference)
  assert fmt == "torchvision"
  backbone_targets = {p for p in reference if p[1] == "backbone"}
  assert set(loaded) == backbone_targets and len(loaded) == 265
  mapped = [r for r in rows if r["status"] == "mapped"]
  skipped = {r["source"]: r["reason"] for r in rows if r["status"] == "skipped"}
  assert len(mapped) + len(skipped) == len(sd) == 320
  assert "classifier" in skipped["fc.weight"] and "counter" in skipped["bn1.num_batches_tracked"]
  kernel, _ = loaded[("params", "backbone", "res3_0", "conv2", "kernel")]
  np.testing.assert_array_equal(kernel, sd["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
  var, src = loaded[("frozen", "backbone", "res2_0", "shortcut_norm", "running_var")]
  assert src == "layer1.0.downsample.1.running_var"
  np.testing.assert_array_equal(var, sd[src])


def test_detectron2_pickle_equals_torchvision(tmp_path, r50_reference):
  config, reference = r50_reference
  sd = torchvision_resnet()
  p = tmp_path / "R-50.pkl"
  p.write_bytes(pickle.dumps(torchvision_to_d2(sd), protocol=2))
  obj = torch_io.load_file(p)
  assert backbones.detect_format(obj["model"]) == "detectron2"
  loaded_d2, rows, _ = _import(obj, "detectron2", config, reference)
  loaded_tv, _, _ = _import(sd, "torchvision", config, reference)
  assert set(loaded_d2) == set(loaded_tv)
  for path in loaded_tv:
    np.testing.assert_array_equal(loaded_d2[path][0], loaded_tv[path][0])
  skipped = {r["source"] for r in rows if r["status"] == "skipped"}
  assert {"stem.fc.weight", "stem.fc.bias", "__author__", "matching_heuristics"} <= skipped


def test_missing_unexpected_misshaped_are_named(r50_reference):
  config, reference = r50_reference
  sd = torchvision_resnet(counters=False)
  del sd["layer3.2.conv2.weight"]
  sd["layer5.0.conv1.weight"] = np.zeros((8, 8, 1, 1), np.float32)
  sd["layer1.0.bn1.weight"] = np.zeros(65, np.float32)
  with pytest.raises(ConversionError) as err:
    _import(sd, "torchvision", config, reference)
  msg = str(err.value)
  assert "backbone/res4_2/conv2/kernel" in msg             # missing
  assert "layer5.0.conv1.weight" in msg                    # unexpected
  assert "layer1.0.bn1.weight" in msg and "(65,)" in msg   # mis-shaped
  with pytest.raises(ConversionError, match="not torchvision backbone keys.*foo.bar"):
    _import({**torchvision_resnet(), "foo.bar": np.zeros(1)}, "torchvision", config, reference)


def test_wrong_depth_and_wrong_format_say_so(r50_reference):
  config, reference = r50_reference
  with pytest.raises(ConversionError, match="ResNet-101.*depth=101"):
    _import(torchvision_resnet(depth=101, counters=False), "torchvision", config, reference)
  with pytest.raises(ConversionError, match="try --format torchvision"):
    _import(torchvision_resnet(), "detectron2", config, reference)


def test_caffe2_is_refused_with_the_reason(r50_reference):
  config, reference = r50_reference
  with pytest.raises(backbones.Caffe2WeightsError) as err:
    _import(dict(CAFFE2), "detectron2", config, reference)
  msg = str(err.value)
  assert "BGR" in msg and "1x1" in msg and "conv1_w" in msg


@pytest.fixture(scope="module")
def swin_t_reference():
  from configs import focus_detr_swin_tiny_224_4scale_12ep
  config = focus_detr_swin_tiny_224_4scale_12ep.get_config()
  return config, flatten(model_shapes(FocusDETR.from_config(config.model)))


def test_official_swin_maps_and_checks_windows(parity_root, swin_t_reference):
  config, reference = swin_t_reference
  manifest = parity_root / "swin_tiny" / "state_dict_manifest.json"
  obj = official_swin(manifest)
  loaded, rows, fmt = _import(obj, "swin", config, reference)
  sd = obj["model"]
  status = collections.Counter(r["status"] for r in rows)
  assert status["checked"] == 12                       # relative_position_index buffers
  assert status["reinitialised"] == 6                  # norm1..3 weight/bias
  skipped = {r["source"] for r in rows if r["status"] == "skipped"}
  assert {"head.weight", "head.bias", "norm.weight", "norm.bias",
          "layers.0.blocks.1.attn_mask"} <= skipped
  assert status["mapped"] + status["checked"] + len(skipped) == len(sd)
  table, _ = loaded[("params", "backbone", "layers_2", "blocks_3", "attn",
                     "relative_position_bias_table")]
  np.testing.assert_array_equal(table, sd["layers.2.blocks.3.attn.relative_position_bias_table"])
  qkv, _ = loaded[("params", "backbone", "layers_0", "blocks_0", "attn", "qkv", "kernel")]
  np.testing.assert_array_equal(qkv, sd["layers.0.blocks.0.attn.qkv.weight"].T)

  # A window-12 checkpoint (e.g. Swin-B 384) does not fit a window-7 config: named, with windows.
  bad = official_swin(manifest, table_window=12)
  with pytest.raises(ConversionError) as err:
    _import(bad, "swin", config, reference)
  msg = str(err.value)
  assert "layers.0.blocks.0.attn.relative_position_bias_table" in msg
  assert "window_size=7" in msg and "is window 12" in msg
  # A Swin file in a ResNet config, and a ResNet file in a Swin config.
  with pytest.raises(ConversionError, match="Swin backbone file"):
    _import(obj, "swin", *_r50())
  with pytest.raises(ConversionError, match="ResNet backbone file"):
    _import(torchvision_resnet(), "torchvision", config, reference)


def _r50():
  from configs import focus_detr_r50_4scale_12ep
  config = focus_detr_r50_4scale_12ep.get_config()
  return config, {}


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

_SMALL = ["--config", str(REPO / "configs" / "tiny.py"), "--config.model.backbone.norm=frozen_bn",
          "--config.model.backbone.base_width=16"]


def _run(*args):
  return import_script("convert_checkpoint").main(["convert_checkpoint.py", *args])


def test_command_converts_a_torchvision_file(tmp_path, capsys):
  sd = torchvision_resnet(width=16)
  src = write_torch_file(tmp_path / "r50_w16.pth", sd)
  out = tmp_path / "ckpt"
  assert _run("--format", "torchvision", *_SMALL, str(src), str(out)) == 0
  text = capsys.readouterr().out
  assert text.strip().splitlines()[-1] == "mapped 265/320 keys"
  assert "fc.weight" in text and "classifier" in text and "re-initialised" in text
  from focus_detr_jax.checkpoint import load_model_checkpoint
  variables, config = load_model_checkpoint(out)
  assert config.model.backbone.base_width == 16
  np.testing.assert_array_equal(variables["frozen"]["backbone"]["res5_2"]["conv3_norm"]["bias"],
                                sd["layer4.2.bn3.bias"])
  np.testing.assert_array_equal(variables["params"]["backbone"]["stem_conv1"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  assert "neck" in variables["params"] and "class_embed_0" in variables["params"]


def test_command_refusals_exit_nonzero(tmp_path, capsys):
  p = tmp_path / "R-50-msra.pkl"
  p.write_bytes(pickle.dumps(CAFFE2, protocol=2))
  assert _run("--format", "detectron2", *_SMALL, str(p), str(tmp_path / "o1")) == 1
  assert "BGR" in capsys.readouterr().err
  p2 = write_torch_file(tmp_path / "ckpt.pth", {"model": torchvision_resnet(width=16),
                                                "optimizer": _Global("torch.optim.sgd", "SGD")})
  assert _run("--format", "torchvision", *_SMALL, str(p2), str(tmp_path / "o2")) == 1
  assert "torch.optim.sgd.SGD at ['optimizer']" in capsys.readouterr().err
  sd = torchvision_resnet(width=16)
  sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"][:8]
  np.savez(tmp_path / "bad.npz", **sd)
  assert _run("--format", "torchvision", *_SMALL, str(tmp_path / "bad.npz"),
              str(tmp_path / "o3")) == 1
  assert "layer1.0.conv1.weight" in capsys.readouterr().err
  assert not (tmp_path / "o3").exists()
  assert _run("--format", "torchvision", str(p), str(tmp_path / "o4")) == 2


@pytest.mark.skipif(not torch_io.torch_available(), reason="torch is not installed")
def test_torch_reads_what_the_fixture_writer_writes(tmp_path):  # pragma: no cover - optional
  import torch
  tree, expected = _sample_tree()
  path = write_torch_file(tmp_path / "w.pth", tree)
  loaded = torch.load(path, weights_only=True)
  for k, want in expected.items():
    got = loaded["model"][k]
    if got.dtype == torch.bfloat16:
      got = got.float()
      want = want.astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), want)


def test_other_files_get_a_clear_error(tmp_path):
  wrapped = tmp_path / "release.zip"
  with zipfile.ZipFile(wrapped, "w") as zf:
    zf.writestr("focus_detr/model.pth", b"x")
  with pytest.raises(torch_io.CheckpointFormatError, match="unzip it"):
    torch_io.load_file(wrapped)
  garbage = tmp_path / "model.ckpt"
  garbage.write_bytes(b"\x0a\x05hello protobuf")
  with pytest.raises(torch_io.CheckpointFormatError, match="not a readable pickle"):
    torch_io.load_file(garbage)
