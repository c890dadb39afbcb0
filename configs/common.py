"""Shared configuration of every Focus-DETR config (detrex `focus_detr_r50.py` + common recipe).

Each config file under `configs/` returns an `ml_collections.ConfigDict` built from
`get_base_config()` with a few overrides; `FrozenConfigDict`-style key checking makes a wrong
override key fail before anything is built.
"""

import ml_collections


def get_base_config():
  """The R50 4-scale 12-epoch Focus-DETR of detrex (spec §14)."""
  config = ml_collections.ConfigDict()

  config.model = model = ml_collections.ConfigDict()
  model.num_classes = 80
  model.backbone = ml_collections.ConfigDict()
  model.backbone.name = "resnet"          # "resnet" | "swin"
  model.backbone.depth = 50               # resnet: 50 | 101
  model.backbone.norm = "frozen_bn"       # resnet: "frozen_bn" (official weights) | "group_norm"
  model.backbone.freeze_at = 1            # detectron2: 1 = the stem never trains
  model.backbone.base_width = 64          # resnet stem width (64 for R50/R101; smaller for tiny tests)
  # Swin settings (used when name == "swin"; spec §11.1).
  model.backbone.embed_dim = 96
  model.backbone.depths = (2, 2, 6, 2)
  model.backbone.num_heads = (3, 6, 12, 24)
  model.backbone.window_size = 7
  model.backbone.drop_path_rate = 0.1
  model.hidden_dim = 256
  model.num_heads = 8
  model.ffn_dim = 2048
  model.num_encoder_layers = 6
  model.num_decoder_layers = 6
  model.num_levels = 4
  model.num_points = 4
  model.num_queries = 900
  model.topk_sa = 300                      # OESM object tokens per encoder layer
  model.focus_rho = 0.5
  model.cascade = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
  # Sine positional encoding: T=10000/offset=-0.5 (12ep and Swin) or T=20/offset=0 (24/36ep R-nets).
  model.pos_temperature = 10000.0
  model.pos_offset = -0.5
  model.num_select = 300                   # detections kept per image at inference
  # Evaluation masks: True = correct padding masks (our default); False = detrex eval (no mask).
  model.eval_padding_mask = True
  # Images coupled inside a batch group (decisions §2): 2 reproduces detrex's per-GPU batch in
  # training; evaluation always uses groups of 1.
  model.batch_group_size = 2
  model.dtype = "float32"                  # "float32" | "bfloat16" | "float64" (compute; params
                                           # stay float32; float64 needs JAX_ENABLE_X64=1)
  # Rematerialisation "<scope>[:<policy>]" (models/remat.py): none | decoder | layers | full,
  # policy nothing | dots. Values are unchanged; it trades backward recomputation for memory
  # (on XLA:CPU only with the memory-minimising scheduler flag: BENCHMARKS.md, "Train step:
  # profile, memory and rematerialisation").
  model.remat = "none"
  # Contrastive denoising (spec §7.3).
  model.dn_number = 100
  model.label_noise_ratio = 0.5
  model.box_noise_scale = 1.0

  config.loss = loss = ml_collections.ConfigDict()
  loss.focal_alpha = 0.25
  loss.focal_gamma = 2.0
  loss.class_weight = 1.0
  loss.bbox_weight = 5.0
  loss.giou_weight = 2.0
  loss.select_weight = 1.5
  loss.matcher_class_cost = 2.0
  loss.matcher_bbox_cost = 5.0
  loss.matcher_giou_cost = 2.0
  loss.fg_strides = (8, 16, 32, 64)
  loss.fg_ranges = ((-1, 64), (64, 128), (128, 256), (256, 999999))

  # Input pipeline (batch_size is the global training batch, eval_batch_size the global eval
  # batch, max_boxes the target slots per image, canvases the static padded shapes).
  from focus_detr_jax.data.pipeline import get_data_config
  config.data = get_data_config("coco")

  # Optimiser (spec §9): AdamW, backbone lr x0.1, no weight decay on norms, clip 0.1, step drops.
  config.optim = optim = ml_collections.ConfigDict()
  optim.lr = 1e-4
  optim.backbone_lr_mult = 0.1
  optim.weight_decay = 1e-4
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.clip_norm = 0.1
  optim.lr_drop_steps = (82500,)       # 12ep: x0.1 at 82.5k of 90k iterations (batch 16)
  optim.lr_drop_factor = 0.1
  optim.warmup_steps = 0               # linear warmup from warmup_factor * lr
  optim.warmup_factor = 0.001
  optim.grad_accum_steps = 1
  optim.ema_decay = 0.0                # 0 = no EMA of the parameters

  config.train = train = ml_collections.ConfigDict()
  train.num_steps = 90000
  train.log_every = 50
  train.checkpoint_every = 1000
  train.keep_checkpoints = 3
  train.eval_every = 5000
  train.image_log_every = 5000
  train.max_minutes = 0.0              # stop (and checkpoint) after this wall time; 0 = no limit

  config.eval = ml_collections.ConfigDict()
  config.eval.max_batches = 0          # 0 = the whole split (per evaluation)

  config.init = ml_collections.ConfigDict()
  # ImageNet backbone file, as detrex's init_checkpoint (convert/backbones.py formats): training
  # refuses to start without it unless "none" (a random backbone) is given explicitly.
  config.init.backbone = "pretrained/r50_v1.pkl"
  config.init.checkpoint = ""          # full model checkpoint (ours or converted detrex)

  config.seed = 0
  return config
