"""Focus-DETR R101 4-scale, 12 epochs (detrex `focus_detr_r101_4scale_12ep.py`): 50.8 AP."""

from configs import common


def get_config():
  config = common.get_base_config()
  config.name = "focus_detr_r101_4scale_12ep"
  config.model.backbone.depth = 101
  config.init.backbone = "pretrained/r101_v1.pkl"   # detrex's ImageNet R-101
  return config
