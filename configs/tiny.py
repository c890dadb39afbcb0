"""A tiny Focus-DETR for fast tests: same structure, small sizes (d_model 64, 2+2 layers)."""

from configs import common


def get_config():
  config = common.get_base_config()
  config.name = "tiny"
  m = config.model
  m.num_classes = 5
  m.backbone.norm = "group_norm"
  m.backbone.base_width = 32           # GroupNorm(32) needs >= 32 channels
  m.backbone.freeze_at = 1
  m.hidden_dim = 64
  m.num_heads = 4
  m.ffn_dim = 128
  m.num_encoder_layers = 2
  m.num_decoder_layers = 2
  m.cascade = (1.0, 0.5)
  m.num_queries = 30
  m.topk_sa = 20
  m.num_select = 20
  m.dn_number = 10
  m.batch_group_size = 2
  config.data.max_boxes = 8
  return config
