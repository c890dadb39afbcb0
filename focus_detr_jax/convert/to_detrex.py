"""Our model -> a detrex state dict (so a model trained here can be evaluated in detrex).

    state_dict = export_detrex_state_dict(variables, model)    # {detrex key: np.ndarray}
    export_checkpoint("runs/x/model", "focus_detr.pth")        # or .npz without torch

The key list is that of detrex's FOCUS_DETR `state_dict()`, in its order, aliases included
(`detrex_key_order`; for the R50 and Swin-T configs it equals the recorded manifests of
shared/parity). Shared modules come out as one array under all their names, like torch saves
them. Values go through the one name mapping of `convert/detrex.py` (`variables_to_state_dict`),
so detrex -> ours -> detrex is bitwise identical.
"""

import dataclasses
import itertools
from pathlib import Path
from typing import Dict, List

import numpy as np

from focus_detr_jax.checkpoint import load_model_checkpoint
from focus_detr_jax.convert.detrex import (ConversionError, alias_groups,
                                           variables_to_state_dict)
from focus_detr_jax.convert.swin import backbone_mapper, swin_key_table
from focus_detr_jax.convert.torch_io import save_state_dict, torch_available
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.models.resnet import RESNET_BLOCKS
from focus_detr_jax.models.swin import SwinTransformer

_FROZEN_BN = ("weight", "bias", "running_mean", "running_var")


def _resnet_keys(bb) -> List[str]:
  if bb["norm"] != "frozen_bn":
    raise ConversionError(
        f"model.backbone.norm={bb['norm']!r}: detrex's ResNet has FrozenBatchNorm only, so a "
        "GroupNorm backbone has no detrex state dict")
  depth = int(bb["depth"])
  if depth not in RESNET_BLOCKS:
    raise ConversionError(f"ResNet depth {depth} has no detrex layout")

  def conv(prefix):
    return [f"{prefix}.weight"] + [f"{prefix}.norm.{leaf}" for leaf in _FROZEN_BN]

  keys = conv("backbone.stem.conv1")
  for stage, blocks in enumerate(RESNET_BLOCKS[depth]):
    for b in range(blocks):
      p = f"backbone.res{stage + 2}.{b}"
      if b == 0:
        keys += conv(f"{p}.shortcut")
      for k in (1, 2, 3):
        keys += conv(f"{p}.conv{k}")
  return keys


def _wb(prefix):
  return [f"{prefix}.weight", f"{prefix}.bias"]


def detrex_key_order(model: FocusDETR) -> List[str]:
  """Every key of detrex's FOCUS_DETR state_dict for `model`, in state_dict order."""
  bb = dataclasses.asdict(model.backbone)
  num_enc, num_dec = model.num_encoder_layers, model.num_decoder_layers
  if bb["name"] == "swin":
    keys = list(swin_key_table(SwinTransformer(
        embed_dim=bb["embed_dim"], depths=tuple(bb["depths"]), num_heads=tuple(bb["num_heads"]),
        window_size=bb["window_size"])))
  else:
    keys = _resnet_keys(bb)
  for i in range(3):
    keys += _wb(f"neck.convs.{i}.conv") + _wb(f"neck.convs.{i}.norm")
  keys += _wb("neck.extra_convs.0.conv") + _wb("neck.extra_convs.0.norm")
  keys += ["transformer.alpha", "transformer.level_embeds"]

  def msda(prefix):
    return sum((_wb(f"{prefix}.attentions.1.{n}") for n in
                ("sampling_offsets", "attention_weights", "value_proj", "output_proj")), [])

  def mha(prefix):
    return [f"{prefix}.attentions.0.attn.in_proj_weight", f"{prefix}.attentions.0.attn.in_proj_bias"
            ] + _wb(f"{prefix}.attentions.0.attn.out_proj")

  def ffn(prefix):
    return _wb(f"{prefix}.ffns.0.layers.0.0") + _wb(f"{prefix}.ffns.0.layers.1")

  for i in range(num_enc):
    p = f"transformer.encoder.layers.{i}"
    keys += mha(p) + msda(p) + ffn(p)
    keys += _wb(f"{p}.norms.0") + _wb(f"{p}.norms.1") + _wb(f"{p}.norm2")
  for i in range(num_enc):
    keys += _wb(f"transformer.encoder.enhance_MCSP.{i}")
  for i in range(num_dec):
    p = f"transformer.decoder.layers.{i}"
    keys += mha(p) + msda(p) + ffn(p) + sum((_wb(f"{p}.norms.{n}") for n in range(3)), [])
  keys += _wb("transformer.decoder.ref_point_head.layers.0")
  keys += _wb("transformer.decoder.ref_point_head.layers.1")
  keys += _wb("transformer.decoder.norm")

  def heads(prefix):
    out = sum((_wb(f"{prefix}class_embed.{k}") for k in range(num_dec + 1)), [])
    for k in range(num_dec + 1):
      out += sum((_wb(f"{prefix}bbox_embed.{k}.layers.{j}") for j in range(3)), [])
    return out

  keys += heads("transformer.decoder.")
  keys += ["transformer.tgt_embed.weight"] + _wb("transformer.enc_output")
  keys += _wb("transformer.enc_output_norm")
  for name in ("layer1.0", "layer1.1", "layer2.0", "layer2.2", "layer2.4"):
    keys += _wb(f"transformer.enc_mask_predictor.{name}")
  keys += heads("") + ["label_enc.weight"]
  for i in range(num_enc):
    keys += _wb(f"enhance_MCSP_layerlist.{i}")
  return keys


def export_detrex_state_dict(variables, model: FocusDETR) -> Dict[str, np.ndarray]:
  """Our variables -> {detrex key: array} with exactly detrex's key set and order; the weight and
  bias keys of a shared module (aliases) hold one array, which `torch_io.save_state_dict` writes
  as one shared tensor, as torch does."""
  num_enc, num_dec = model.num_encoder_layers, model.num_decoder_layers
  try:
    state_dict = variables_to_state_dict(variables, detrex_key_order(model), num_dec, num_enc,
                                         backbone_mapper=backbone_mapper(model))
  except KeyError as e:
    raise ConversionError(f"the variables have no entry {e} that the config's detrex layout "
                          "needs: do the variables come from this config?") from None
  # An alias maps to its canonical key's variable, so the two arrays are equal: share one.
  for canonical, aliases in alias_groups(num_dec, num_enc).items():
    for alias, leaf in itertools.product(aliases, ("weight", "bias")):
      if f"{alias}.{leaf}" in state_dict and f"{canonical}.{leaf}" in state_dict:
        state_dict[f"{alias}.{leaf}"] = state_dict[f"{canonical}.{leaf}"]
  return state_dict


def default_output_name(directory) -> Path:
  """`<checkpoint dir>.pth` when torch is installed, else `.npz`."""
  return Path(str(Path(directory).absolute()) + (".pth" if torch_available() else ".npz"))


def export_checkpoint(checkpoint_dir, output_path=None):
  """Write one of our model checkpoints as a detrex state dict file (.pth or .npz).

  Returns (output path, state dict).
  """
  variables, config = load_model_checkpoint(checkpoint_dir)
  state_dict = export_detrex_state_dict(variables, FocusDETR.from_config(config.model))
  path = Path(output_path) if output_path else default_output_name(checkpoint_dir)
  save_state_dict(state_dict, path)
  return path, state_dict
