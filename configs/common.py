"""Shared configuration of every Focus-DETR config (detrex `focus_detr_r50.py` + common recipe).

Each config file under `configs/` returns an `ml_collections.ConfigDict` built from
`get_base_config()` with a few overrides; `FrozenConfigDict`-style key checking makes a wrong
override key fail before anything is built. `get_data_config(preset)` is the `config.data`
section alone (the input pipeline's settings, read by `focus_detr_jax.data`).
"""

import ml_collections

# The COCO recipe's canvases: `buckets.choose_train_canvases(num_buckets=2, max_rescale=0.01,
# group_bounds=COCO_GROUP_BOUNDS)` and `buckets.choose_eval_canvases` on
# `buckets.COCO_LIKE_SIZE_MIX` (`scripts/benchmark_input.py --choose` recomputes them).
COCO_GROUP_BOUNDS = (0.72, 1.0, 1.4)
COCO_SCALE_BUCKETS = ((480, 512, 544, 576, 608, 640), (672, 704, 736, 768, 800))
COCO_TRAIN_CANVASES = ((640, 1297), (800, 1333), (640, 853), (800, 1067),
                       (853, 640), (1069, 800), (1138, 640), (1333, 800))
COCO_EVAL_CANVASES = ((800, 1067), (800, 1199), (750, 1333), (1067, 800), (1199, 800),
                      (1333, 750))


def get_data_config(preset: str = "coco") -> ml_collections.ConfigDict:
  """The `config.data` section. `preset`: "coco" (detrex recipe), "synthetic" (256x256 demo).

  Sizes: `train_scales`/`train_max_size` and the crop branch follow spec §9 for COCO; the
  synthetic preset scales them to a 256x256 canvas.
  """
  c = ml_collections.ConfigDict()
  c.dataset = "coco"                  # "synthetic" | "coco" | "coco_folder"
  # Optional fields are typed placeholders (None by default) so `--config.data.x=...` works.
  c.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir (local or gs://)
  c.tfds_name = "coco/2017"       # TFDS name of the "coco" dataset
  c.train_split = "train"
  c.eval_split = "validation"
  c.folder = ml_collections.ConfigDict()
  c.folder.train_images = ""          # directory of the training images
  c.folder.train_annotations = ""     # instances JSON of the training images
  c.folder.eval_images = ""
  c.folder.eval_annotations = ""
  c.folder.name = ""                  # readable part of the TFDS config name (optional)
  c.folder.verify = "full"            # "full": decode every image at preparation; "header"
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.difficulty = "easy"     # "easy" | "hard"
  c.synthetic.image_size = 256        # side of the square images (the height if image_width)
  c.synthetic.image_width = 0         # > 0: non-square images, image_size x image_width (H x W)
  c.synthetic.num_train = 1000
  c.synthetic.num_val = 200
  c.synthetic.seed = 0
  c.synthetic.root = ""               # "" -> $FOCUS_DETR_DATA_DIR/synthetic or ~/.cache/...
  # Static shapes.
  # Training canvases (docs/data.md §5): group-major, one per (aspect group, scale bucket);
  # for COCO 4 aspect groups (h/w < 0.72, < 1, < 1.4, >= 1.4) x 2 scale buckets = 8 shapes,
  # chosen by `buckets.choose_train_canvases` (BENCHMARKS.md, "Input pipeline").
  c.group_bounds = ml_collections.config_dict.placeholder(tuple)  # None: by the canvas count
  c.group_bounds = COCO_GROUP_BOUNDS  # h/w bounds of the aspect groups (ascending)
  c.scale_buckets = ml_collections.config_dict.placeholder(tuple)  # None: one, scale per image
  c.scale_buckets = COCO_SCALE_BUCKETS  # a partition of train_scales: the scale is per step
  c.canvases = COCO_TRAIN_CANVASES
  c.canvas_weights = ml_collections.config_dict.placeholder(tuple)  # per aspect group; None:
                                      # measured from the data (each image equally often)
  c.schedule_sample_images = 2000     # images whose header sizes measure those weights
  c.eval_canvases = ml_collections.config_dict.placeholder(tuple)  # None: same as `canvases`
  c.eval_canvases = COCO_EVAL_CANVASES
  c.eval_exact = False                # eval without canvases: batch 1, one shape per image
  c.max_boxes = 100
  c.batch_size = 16                   # global training batch (split evenly over hosts)
  c.eval_batch_size = 8               # global eval batch
  c.seed = 0
  c.shuffle_buffer = 1000             # encoded images (after file-level shuffling)
  c.num_parallel_calls = -1           # -1: tf.data AUTOTUNE
  c.prefetch_batches = 2
  # Augmentation (spec §9).
  c.augment = True
  c.flip_prob = 0.5
  c.crop_prob = 0.5
  c.train_scales = tuple(range(480, 801, 32))
  c.train_max_size = 1333
  c.crop_resize_scales = (400, 500, 600)
  c.crop_resize_max_size = 0          # 0: unlimited, as detectron2
  c.crop_size_range = (384, 600)
  c.eval_scale = 800
  c.eval_max_size = 1333
  c.drop_crowd = True
  c.skip_images_without_annotations = True
  c.pixel_mean = (123.675, 116.28, 103.53)
  c.pixel_std = (58.395, 57.12, 57.375)
  if preset == "synthetic":
    c.dataset = "synthetic"
    c.group_bounds = None
    c.scale_buckets = None
    c.canvases = ((256, 256),)
    c.eval_canvases = None
    c.train_scales = tuple(range(160, 257, 16))
    c.train_max_size = 256
    c.crop_resize_scales = (128, 160, 192)
    c.crop_size_range = (120, 192)
    c.eval_scale = 256
    c.eval_max_size = 256
    c.batch_size = 8
    c.shuffle_buffer = 256
  elif preset != "coco":
    raise ValueError(f"Unknown data preset {preset!r}; use 'coco' or 'synthetic'.")
  return c


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
  # Rematerialisation (models/remat.py): "auto" (per training canvas: "full" above 1.8 M pixels
  # per device batch, else "layers") or "<scope>[:<policy>]" with scope none | decoder | layers |
  # backbone | full, policy nothing | dots. Values are unchanged; it trades backward
  # recomputation for memory (on XLA:CPU with train.xla_cpu_scheduler="memory": BENCHMARKS.md,
  # "Train step: profile, memory and rematerialisation").
  model.remat = "auto"
  # Deformable-attention formulation (models/deformable_attention.py): "auto" (per backend:
  # gather_vjp on CPU, gather on GPU/TPU) or one of its IMPLEMENTATIONS (same function; speed).
  model.msda_implementation = "auto"
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
  # XLA:CPU's instruction scheduler for this process (focus_detr_jax/xla_options.py): "memory"
  # (memory-minimising; fewer temporaries, no slower on the 2-core CPU) | "concurrency" (XLA's
  # default). Set before JAX starts; an explicit flag in XLA_FLAGS wins. No effect on GPU/TPU.
  train.xla_cpu_scheduler = "memory"

  config.eval = ml_collections.ConfigDict()
  config.eval.max_batches = 0          # 0 = the whole split (per evaluation)

  config.init = ml_collections.ConfigDict()
  # ImageNet backbone file, as detrex's init_checkpoint (convert/backbones.py formats): training
  # refuses to start without it unless "none" (a random backbone) is given explicitly.
  config.init.backbone = "pretrained/r50_v1.pkl"
  config.init.checkpoint = ""          # full model checkpoint (ours or converted detrex)
  config.init.backbone_format = "auto"     # auto | torchvision | detectron2 | swin | detrex
  config.init.checkpoint_format = "auto"   # auto | ours | detrex

  config.seed = 0
  return config
