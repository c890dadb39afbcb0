#!/usr/bin/env python
"""Record a parity reference set from the official detrex Focus-DETR (PyTorch, CPU).

Runs in the *reference* environment (torch CPU + detectron2 + detrex at the pinned commits, see
docs/reproducibility.md), not in the project's .venv. Writes a directory laid out like
`shared/parity/public`, which `scripts/check_parity.py --reference-dir DIR` then compares.

  # the public set's layout for seed 0 (R50, two 320x480 / 256x384 images)
  python scripts/record_reference.py --detrex-root /path/to/detrex --out sets/r50_seed0
  # another seed and image sizes, eval + losses only
  python scripts/record_reference.py --detrex-root /path/to/detrex --out sets/r50_s3 \\
      --seed 3 --sizes 352x416,288x320 --parts eval,train
  # a Swin-T config with a real checkpoint instead of the weight rule (eval only)
  python scripts/record_reference.py --detrex-root /path/to/detrex --out sets/swin_t_ckpt \\
      --config projects/focus_detr/configs/focus_detr_swin/focus_detr_swin_tiny_224_4scale_12ep.py \\
      --checkpoint focus_detr_swin_t.pth --parts eval --inputs-from my_images.npz

Image sizes: detrex's OESM takes topk(300) over the last cascade layer's 0.2*T tokens, so the
largest image of a batch needs about 3000 tokens (e.g. 320x480 or 352x416); smaller images
crash inside detrex (parity/README §6.13).
"""

import argparse
import os
import sys


DEFAULT_CONFIG = "projects/focus_detr/configs/focus_detr_resnet/focus_detr_r50_4scale_12ep.py"


def parse_sizes(text):
  if not text:
    return None
  return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--out", required=True, help="output directory (created)")
  p.add_argument("--config", default=DEFAULT_CONFIG,
                 help="detrex Focus-DETR LazyConfig, relative to --detrex-root or absolute")
  p.add_argument("--detrex-root", default=os.environ.get("DETREX_ROOT"),
                 help="detrex source tree (holds projects/focus_detr); env DETREX_ROOT")
  p.add_argument("--seed", type=int, default=0, help="weight rule + input RNG seed")
  p.add_argument("--sizes", default="320x480,256x384", help="eval batch image sizes HxW,...")
  p.add_argument("--train-sizes", default=None, help="train batch sizes (default: --sizes)")
  p.add_argument("--parts", default="eval,train,grads,dn,msda",
                 help="comma list of eval, train, grads, dn, msda")
  p.add_argument("--checkpoint", default=None,
                 help="detrex .pth to load instead of the deterministic weight rule "
                      "(its sha256 goes to meta.json; the manifest rule becomes 'checkpoint')")
  p.add_argument("--inputs-from", default=None,
                 help="an inputs.npz (images, boxes, labels) to use instead of the seed's draws")
  p.add_argument("--msda-from", default=None,
                 help="an ms_deform_attn.npz whose inputs/weights to reuse")
  p.add_argument("--force-eval-from", default=None,
                 help="a recorded set whose eval top-k indices (cascade, OESM, two-stage) are "
                      "forced in the eval forward, to compare recordings across CPUs")
  p.add_argument("--compact", action="store_true",
                 help="smaller files: no full encoder memory, small full-gradient arrays only, "
                      "a smaller deformable-attention check")
  p.add_argument("--threads", type=int, default=2, help="torch threads (reference: 2)")
  p.add_argument("--cpu-capability", default="avx2",
                 help="ATEN_CPU_CAPABILITY (reference: avx2; 'none' = torch's default)")
  p.add_argument("--name", default=None, help="set name for meta.json (default: the folder)")
  args = p.parse_args(argv)

  from focus_detr_jax.reference import recorder   # after parsing: torch loads with the recorder
  cap = None if args.cpu_capability.lower() == "none" else args.cpu_capability
  recorder.configure_cpu(args.threads, cap)
  parts = [x.strip() for x in args.parts.split(",") if x.strip()]
  unknown = set(parts) - set(recorder.PARTS)
  if unknown:
    p.error(f"unknown parts {sorted(unknown)}; choose from {recorder.PARTS}")
  try:
    meta = recorder.record(
        args.out, args.config, seed=args.seed, eval_sizes=parse_sizes(args.sizes),
        train_sizes=parse_sizes(args.train_sizes), parts=parts, detrex_root=args.detrex_root,
        checkpoint=args.checkpoint, inputs_from=args.inputs_from, threads=args.threads,
        set_name=args.name, compact=args.compact, msda_from=args.msda_from,
        force_eval_from=args.force_eval_from,
        log=lambda m: print(m, flush=True))
  except recorder.DetrexNotImportable as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out}: parts {meta['parts']}, {meta['seconds']['total']:.1f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
