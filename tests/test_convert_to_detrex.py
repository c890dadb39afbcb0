"""Export to detrex: exact key set and order, and a bitwise round trip detrex -> ours -> detrex."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from focus_detr_jax.convert import init as init_lib
from focus_detr_jax.convert import torch_io
from focus_detr_jax.convert.detrex import ConversionError
from focus_detr_jax.convert.to_detrex import detrex_key_order, export_detrex_state_dict
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.parity.weights import build_state_dict
from conftest import import_script

REPO = Path(__file__).resolve().parents[1]
SETS = {"public": "focus_detr_r50_4scale_12ep", "swin_tiny": "focus_detr_swin_tiny_224_4scale_12ep",
        "swin_base_384": "focus_detr_swin_base_384_4scale_36ep"}


def _model(name):
  import importlib
  return FocusDETR.from_config(importlib.import_module(f"configs.{name}").get_config().model)


@pytest.mark.parametrize("reference_set", sorted(SETS))
def test_key_order_is_the_detrex_state_dict(request, reference_set):
  # The R50 manifest is in the repository (tests/data/parity); the Swin ones need shared/parity.
  root = request.getfixturevalue("r50_set" if reference_set == "public" else "parity_root")
  set_dir = root if reference_set == "public" else root / reference_set
  manifest = json.loads((set_dir / "state_dict_manifest.json").read_text())
  assert detrex_key_order(_model(SETS[reference_set])) == [row[0] for row in manifest]


def _assert_bitwise(got, want):
  assert list(got) == list(want)
  for key in want:
    assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_r50_round_trip_through_files_is_bitwise(r50_set, tmp_path, capsys):
  manifest = r50_set / "state_dict_manifest.json"
  state_dict = build_state_dict(manifest, seed=0)
  np.savez(tmp_path / "detrex.npz", **state_dict)
  convert_detrex = import_script("convert_detrex")
  config = str(REPO / "configs" / "focus_detr_r50_4scale_12ep.py")
  assert convert_detrex.main(["convert_detrex.py", "--config", config,
                              str(tmp_path / "detrex.npz"), str(tmp_path / "ours")]) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1] == "mapped 625/625 keys"
  convert = import_script("convert_checkpoint")
  assert convert.main(["convert_checkpoint.py", "--export", str(tmp_path / "ours"),
                       str(tmp_path / "back.npz")]) == 0
  _assert_bitwise(torch_io.load_file(tmp_path / "back.npz"), state_dict)


def test_swin_round_trip_is_bitwise(parity_root, tmp_path):
  state_dict = build_state_dict(parity_root / "swin_tiny" / "state_dict_manifest.json", seed=0)
  np.savez(tmp_path / "swin.npz", **state_dict)
  model = _model(SETS["swin_tiny"])
  variables, report = init_lib.init_from_checkpoint(init_lib.model_shapes(model),
                                                    tmp_path / "swin.npz", model)
  assert report["num_mapped"] == report["num_source_keys"] == 627 - 80
  back = export_detrex_state_dict(variables, model)
  _assert_bitwise(back, state_dict)
  assert back["backbone.layers.0.blocks.0.attn.relative_position_index"].dtype == np.int64
  # Shared modules come out as one array under all their names, as torch saves them.
  assert back["class_embed.6.weight"] is back["transformer.encoder.enhance_MCSP.0.weight"]
  assert (back["bbox_embed.3.layers.2.bias"]
          is back["transformer.decoder.bbox_embed.3.layers.2.bias"])


def test_group_norm_backbone_has_no_detrex_layout():
  from configs import tiny
  with pytest.raises(ConversionError, match="GroupNorm"):
    detrex_key_order(FocusDETR.from_config(tiny.get_config().model))


@pytest.mark.skipif(torch_io.torch_available(), reason="torch is installed: .pth is written")
def test_pth_without_torch_says_to_use_npz(tmp_path, capsys):
  with pytest.raises(RuntimeError, match=r"\.npz"):
    torch_io.save_state_dict({"a": np.zeros(2, np.float32)}, tmp_path / "x.pth")
  from focus_detr_jax.convert.to_detrex import default_output_name
  assert default_output_name(tmp_path / "ckpt").suffix == ".npz"


@pytest.mark.skipif(not torch_io.torch_available(), reason="torch is not installed")
def test_pth_with_torch(tmp_path):  # pragma: no cover - optional
  state = {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.float32)}
  state["alias_of_a"] = state["a"]
  torch_io.save_state_dict(state, tmp_path / "x.pth")
  for backend in ("torch", "numpy"):
    loaded = torch_io.load_file(tmp_path / "x.pth", backend=backend)["model"]
    assert list(loaded) == list(state)
    for k in state:
      np.testing.assert_array_equal(loaded[k], state[k])
