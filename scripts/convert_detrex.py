r"""Convert a detrex Focus-DETR checkpoint: `convert_checkpoint.py --format detrex`.

  python scripts/convert_detrex.py --config configs/focus_detr_r50_4scale_12ep.py \
      focus_detr_r50_4scale_12ep.pth checkpoints/focus_detr_r50

Same flags, output and exit status as scripts/convert_checkpoint.py.
"""

import sys

from focus_detr_jax import cli
from focus_detr_jax.convert import command


def main(argv=None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if any(a == "--format" or a.startswith("--format=") for a in argv[1:]):
    print("error: convert_detrex.py always uses --format detrex", file=sys.stderr)
    return 2
  return cli.main(__doc__, command.define_flags, command.run,
                  argv[:1] + ["--format=detrex"] + argv[1:])


if __name__ == "__main__":
  cli.exit_with(main())
