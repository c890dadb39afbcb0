"""Focus-DETR R50 4-scale, 12 epochs (detrex `focus_detr_r50_4scale_12ep.py`): 48.8 AP."""

from configs import common


def get_config():
  config = common.get_base_config()
  config.name = "focus_detr_r50_4scale_12ep"
  return config
