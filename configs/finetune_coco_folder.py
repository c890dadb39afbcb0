"""Fine-tune Focus-DETR (R50) on a local COCO-format folder: images + an instances JSON.

  python scripts/train.py --workdir=runs/mine \
      --config=configs/finetune_coco_folder.py:num_images=2400,batch_size=16 \
      --config.model.num_classes=3 \
      --config.data.folder.train_images=/data/mine/train \
      --config.data.folder.train_annotations=/data/mine/train.json \
      --config.data.folder.eval_images=/data/mine/val \
      --config.data.folder.eval_annotations=/data/mine/val.json \
      --config.init.checkpoint=checkpoints/focus_detr_r50    # or --config.init.backbone=R-50.pkl

Recipe (detrex's, spec §14): AdamW lr 1e-4, weight decay 1e-4 (none on norms), backbone lr x0.1,
gradient clip 0.1 (global L2 norm), frozen stem (`freeze_at=1`), lr x0.1 for the last twelfth.

Schedule scaled to the dataset (`num_images` N and global batch B from the config argument).
detrex trains 12 epochs of COCO (90k steps at batch 16) and drops the lr at epoch 11 (82.5k =
11/12 of training). A small dataset gets more epochs, so that training still takes at least
`MIN_STEPS` optimiser steps:

    steps_per_epoch = ceil(N / B)
    epochs          = min(MAX_EPOCHS, max(12, ceil(MIN_STEPS / steps_per_epoch)))
    lr drop         = at epoch round(epochs * 11 / 12)

e.g. N = 118k, B = 16 (COCO): 12 epochs (88,716 steps), drop at 11; N = 2400, B = 16: 34 epochs
(5,100 steps), drop at 31; N = 1000, B = 16: 80 epochs (5,040 steps), drop at 73. The trainer
reads the steps (`train.num_steps`, `optim.lr_drop_steps`); `optim.epochs` /
`optim.lr_drop_epochs` record the same schedule in epochs. Without `num_images` the detrex
schedule (90k steps, drop at 82.5k) is kept.

Start from (`config.init`, applied by `focus_detr_jax.convert.init.apply_init`):
  * `checkpoint`: one of our model checkpoints or a detrex `.pth` (e.g. the COCO-trained
    Focus-DETR, converted with scripts/convert_checkpoint.py). The class heads and the denoising
    label embedding are re-initialised when `num_classes` differs; everything else is restored.
  * `backbone`: ImageNet weights (torchvision `.pth`, detectron2 `.pkl`, official Swin `.pth`);
    the rest of the model starts from scratch (needs many more steps than a COCO checkpoint).
Set `model.num_classes` to the number of categories in the instances JSON (ids are mapped to
labels 0..C-1 in increasing id order).
"""

import math

from configs import common

BASE_EPOCHS = 12          # detrex 12ep: 90k steps x 16 images ~ 12 COCO epochs
BASE_DROP_FRACTION = 11 / 12
MIN_STEPS = 5000          # optimiser steps a small dataset still gets
MAX_EPOCHS = 200


def schedule(num_images: int, batch_size: int):
  """(steps_per_epoch, epochs, lr_drop_epoch) of the rule in the module docstring."""
  steps_per_epoch = math.ceil(num_images / batch_size)
  epochs = min(MAX_EPOCHS, max(BASE_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))
  return steps_per_epoch, epochs, round(epochs * BASE_DROP_FRACTION)


def _parse(arg):
  values = {"num_images": 0, "batch_size": 16}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in values:
      raise ValueError(f"unknown config argument {key!r}; expected num_images=N,batch_size=B")
    values[key] = int(value)
  return values


def get_config(arg=None):
  args = _parse(arg)
  config = common.get_base_config()
  config.name = "finetune_coco_folder"
  config.model.num_classes = 80            # set to the number of categories in your JSON
  config.model.backbone.freeze_at = 1      # frozen stem (detectron2/detrex default)

  config.init.backbone = ""                # ImageNet backbone file (torchvision/detectron2/swin)
  config.init.checkpoint = ""              # full model: our checkpoint dir or a detrex .pth

  data = config.data
  data.dataset = "coco_folder"
  data.folder.train_images = ""            # folder of training images
  data.folder.train_annotations = ""       # COCO instances JSON of the training images
  data.folder.eval_images = ""
  data.folder.eval_annotations = ""
  data.batch_size = args["batch_size"]     # global batch

  optim = config.optim
  optim.lr = 1e-4
  optim.backbone_lr_mult = 0.1
  optim.weight_decay = 1e-4
  optim.clip_norm = 0.1
  optim.warmup_steps = 0
  optim.lr_drop_factor = 0.1
  if args["num_images"] > 0:
    steps_per_epoch, epochs, drop = schedule(args["num_images"], args["batch_size"])
    config.train.num_steps = epochs * steps_per_epoch
    optim.lr_drop_steps = (drop * steps_per_epoch,)
    config.train.eval_every = steps_per_epoch * max(1, epochs // 12)   # ~12 evaluations
    config.train.checkpoint_every = min(1000, config.train.eval_every)
  else:                                    # detrex 12ep: 90k steps, drop at 82.5k
    steps_per_epoch, epochs, drop = 7500, BASE_EPOCHS, 11
  optim.epochs = epochs                    # the same schedule in epochs (informational)
  optim.lr_drop_epochs = (drop,)
  optim.steps_per_epoch = steps_per_epoch
  return config
