"""A tiny Focus-DETR for fast tests: same structure, small sizes (d_model 64, 2+2 layers)."""

from configs import common


def get_config():
  config = common.get_base_config()
  config.name = "tiny"
  m = config.model
  m.num_classes = 4                     # the easy synthetic set
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
  # Data for loop tests: a small synthetic set on one 128x128 canvas.
  config.data = common.get_data_config("synthetic")
  config.data.synthetic.image_size = 128
  config.data.synthetic.num_train = 32
  config.data.synthetic.num_val = 8
  config.data.canvases = ((128, 128),)
  config.data.train_scales = (96, 112, 128)
  config.data.train_max_size = 128
  config.data.crop_resize_scales = (64, 96)
  config.data.crop_size_range = (48, 96)
  config.data.eval_scale = 128
  config.data.eval_max_size = 128
  config.data.batch_size = 2
  config.data.eval_batch_size = 2
  config.data.shuffle_buffer = 16
  config.data.max_boxes = 8
  config.init.backbone = "none"        # trains from scratch (no ImageNet file)
  config.train.num_steps = 6
  config.train.log_every = 1
  config.train.checkpoint_every = 2
  config.train.eval_every = 0
  config.optim.warmup_steps = 0
  config.optim.lr_drop_steps = ()
  return config
