"""The README demo: a small Focus-DETR trained from scratch on the synthetic dataset on CPU.

Same architecture as the paper's model (FTS, cascade, dual-attention encoder, DINO decoder with
denoising), scaled down for a 2-core CPU (decisions §10): trainable GroupNorm ResNet (bottleneck
blocks 2-2-2-2, width 16), d_model 128, 3+3 layers, 100 queries, a 256x256 canvas.
What it reaches in its time budget: BENCHMARKS.md, section "Demo".
"""

from configs import common


def get_config():
  config = common.get_base_config()
  config.name = "demo_synthetic"
  config.data = common.get_data_config("synthetic")
  config.data.batch_size = 8
  config.data.eval_batch_size = 8
  config.data.max_boxes = 8             # the easy set has 1-4 objects per image
  # A short schedule: keep flips and scale jitter, skip the crop branch (it slows convergence
  # more than it helps generalisation in ~1000 steps), and stay near the native 256 pixels.
  config.data.crop_prob = 0.0
  config.data.train_scales = tuple(range(192, 257, 16))
  m = config.model
  m.num_classes = 4                     # the easy synthetic set (updated from its metadata)
  m.backbone.norm = "group_norm"
  m.backbone.depth = 26
  m.backbone.base_width = 16
  m.backbone.freeze_at = 0              # from scratch: nothing frozen
  m.hidden_dim = 128
  m.num_heads = 4
  m.ffn_dim = 512
  m.num_encoder_layers = 3
  m.num_decoder_layers = 3
  m.cascade = (1.0, 0.6, 0.3)
  m.num_queries = 100
  m.topk_sa = 64
  m.num_select = 100
  m.dn_number = 20
  m.remat = "none"                      # 8 x 256x256 fits easily: no recomputation (as measured)
  config.optim.lr = 4e-4
  config.optim.backbone_lr_mult = 1.0   # the backbone trains from scratch too
  config.optim.clip_norm = 0.1
  config.optim.warmup_steps = 100
  config.optim.lr_drop_steps = (1600,)
  config.init.backbone = "none"        # trains from scratch (no ImageNet file)
  config.train.num_steps = 2000
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.train.image_log_every = 250
  config.train.eval_every = 0           # evaluate once at the end
  config.train.max_minutes = 11.0     # + final eval: the demo stays within 15 minutes
  return config
