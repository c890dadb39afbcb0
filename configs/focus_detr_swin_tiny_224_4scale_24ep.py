"""Focus-DETR Swin-tiny_224 4-scale, 24 epochs (detrex `focus_detr_swin_tiny_224_4scale_24ep.py`): 51.2 AP."""

from configs import common
from configs import swin


def get_config():
  config = swin.apply_swin(common.get_base_config(), "tiny_224")
  config.name = "focus_detr_swin_tiny_224_4scale_24ep"
  config.train.num_steps = 180000
  config.optim.lr_drop_steps = (150000,)
  return config
