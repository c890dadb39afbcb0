"""Focus-DETR R50 4-scale, 24 epochs (detrex `focus_detr_r50_4scale_24ep.py`).

The 24/36-epoch R-net checkpoints use positional-encoding temperature 20 and offset 0 (spec §1.4).
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.name = "focus_detr_r50_4scale_24ep"
  config.model.pos_temperature = 20.0
  config.model.pos_offset = 0.0
  config.train.num_steps = 180000
  config.optim.lr_drop_steps = (150000,)
  return config
