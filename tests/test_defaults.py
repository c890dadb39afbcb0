"""The library's field defaults (detrex's values, for use without a config: `LossConfig()` in the
criterion's signatures, `FocusDETR(...)` in tests) equal what configs/common.py sets, so the two
places cannot drift apart. Every config sets each field explicitly; none relies on a default."""

import dataclasses

from configs import focus_detr_r50_4scale_12ep
from focus_detr_jax.models.focus_detr import FocusDETR
from focus_detr_jax.train import foreground
from focus_detr_jax.train.criterion import LossConfig
from focus_detr_jax.train.matcher import MatcherConfig


def test_loss_and_matcher_defaults_are_the_configs():
  config = focus_detr_r50_4scale_12ep.get_config()
  assert LossConfig.from_config(config) == LossConfig()
  assert MatcherConfig.from_config(config.loss) == MatcherConfig()
  assert tuple(config.loss.fg_strides) == foreground.DEFAULT_STRIDES
  assert tuple(map(tuple, config.loss.fg_ranges)) == foreground.DEFAULT_RANGES


def test_model_defaults_are_the_r50_config():
  built, default = FocusDETR.from_config(focus_detr_r50_4scale_12ep.get_config().model), FocusDETR()
  differ = {f.name: (getattr(built, f.name), getattr(default, f.name))
            for f in dataclasses.fields(FocusDETR)
            if f.name not in ("parent", "name", "backbone")
            and getattr(built, f.name) != getattr(default, f.name)}
  # remat: the COCO configs choose by input size; the bare module recomputes nothing.
  assert differ == {"remat": ("auto", "none")}
