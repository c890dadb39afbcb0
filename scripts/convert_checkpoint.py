r"""Convert weights into one of our model checkpoints, or export ours back to detrex.

Import (every format writes a model checkpoint that training and predict accept):

  python scripts/convert_checkpoint.py --format detrex --config configs/focus_detr_r50_4scale_12ep.py \
      focus_detr_r50_4scale_12ep.pth checkpoints/focus_detr_r50
  python scripts/convert_checkpoint.py --format torchvision --config configs/focus_detr_r50_4scale_12ep.py \
      resnet50-0676ba61.pth checkpoints/r50_imagenet
  python scripts/convert_checkpoint.py --format detectron2 --config ... R-50.pkl OUTPUT_DIR
  python scripts/convert_checkpoint.py --format swin --config configs/focus_detr_swin_tiny_224_4scale_12ep.py \
      swin_tiny_patch4_window7_224.pth checkpoints/swin_t_imagenet

Config overrides follow the config file: `--config.model.num_classes=3`. Prints what was mapped,
skipped (with the reason) and re-initialised (`--verbose`: every array), and ends with
`mapped N/M keys` (M: the input state dict's keys, aliases once). A backbone file gives a full
checkpoint whose neck, transformer and heads are a fresh init (seed `config.seed`).

Export (one of our model checkpoints -> detrex state dict, `.pth` with torch, else `.npz`):

  python scripts/convert_checkpoint.py --export checkpoints/my_model my_model.pth

Exit status: 0 on success; 1 when the input is refused or does not fit the config (one
`error: ...` line naming the keys or objects at fault; `--debug` for the traceback); 2 on a usage
error.
"""

from focus_detr_jax import cli
from focus_detr_jax.convert import command


def main(argv=None) -> int:
  return cli.main(__doc__, command.define_flags, command.run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
