"""Focus-DETR Swin-tiny_224 4-scale, 36 epochs (detrex `focus_detr_swin_tiny_224_4scale_36ep.py`): 52.5 AP."""

from configs import common
from configs import swin


def get_config():
  config = swin.apply_swin(common.get_base_config(), "tiny_224")
  config.name = "focus_detr_swin_tiny_224_4scale_36ep"
  config.train.num_steps = 270000
  config.optim.lr_drop_steps = (225000,)
  return config
