"""Focus-DETR Swin-large_384 4-scale, 36 epochs (detrex `focus_detr_swin_large_384_4scale_36ep.py`): 56.3 AP."""

from configs import common
from configs import swin


def get_config():
  config = swin.apply_swin(common.get_base_config(), "large_384")
  config.name = "focus_detr_swin_large_384_4scale_36ep"
  config.train.num_steps = 270000
  config.optim.lr_drop_steps = (225000,)
  return config
