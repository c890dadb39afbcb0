r"""Detect objects in images, a folder or a dataset split; write COCO results and pictures.

  # a model checkpoint (converted detrex weights or an exported training run); its config.json
  # is used unless --config is given
  python scripts/predict.py --checkpoint=checkpoints/focus_detr_r50 \
      --inputs=photo.jpg,more_photos/ --output_dir=predictions --tokens

  # the latest training checkpoint of a workdir (its config.json, or --config)
  python scripts/predict.py --config=configs/demo_synthetic.py --workdir=/tmp/run \
      --split=validation --max_images=8 --tokens --output_dir=/tmp/run/predictions

Images go through the evaluation transform and canvases (`config.data.eval_canvases` or
`canvases`), so each canvas compiles once; `--batch_size` images per forward (default
`data.eval_batch_size`). Config overrides follow --config: `--config.data.eval_scale=640`.

Writes to --output_dir:
  detections.json   COCO results: image_id, category_id (the dataset's original ids when the
                    config's dataset metadata has them, else the contiguous label), bbox [x, y, w,
                    h] in original image pixels, score (top `model.num_select` per image, no NMS)
  images.json       {"images": [{id, file_name, height, width, path, output_name}],
                    "categories": [{id, name}]} (path: the absolute file path; output_name: NAME)
  skipped.json      inputs that were missing or unreadable, with the reason (also printed)
  overlays/NAME.png detections with score >= --score_threshold over the original image
  tokens/NAME.png   with --tokens: foreground-score heatmaps per level, the tokens each encoder
                    layer updates and the object tokens (paper figures 1 and 4)
Image ids are the file stems when they are all distinct integers (COCO file names), else
0..n-1 in input order; NAME is the file stem (or the image id of a split).

Exit status: 0 when at least one image was predicted, 1 when none was (or on a load error,
printed as one `error: ...` line; `--debug` for the traceback), 2 on a usage error. With
--workdir an unreadable newest checkpoint is skipped for the next older one (with a warning).
Runs unchanged on CPU, GPU and TPU (one device; single host).
"""

import json
import sys
import time
from pathlib import Path

from absl import flags

from focus_detr_jax import cli


def define_flags(fv, argv):
  cli.define_config(fv, argv, required=False, help_text="config file (default: the config.json "
                    "of --checkpoint or --workdir), then `--config.<key>=value` overrides")
  flags.DEFINE_string("checkpoint", None, "model checkpoint directory (variables/ + config.json)",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "training workdir: its newest checkpoint that restores",
                      flag_values=fv)
  flags.DEFINE_list("inputs", [], "image files and/or folders", flag_values=fv)
  flags.DEFINE_string("split", None, "a split of the config's dataset instead of --inputs "
                      "(e.g. validation)", flag_values=fv)
  flags.DEFINE_string("output_dir", None, "where the results go", flag_values=fv)
  flags.DEFINE_float("score_threshold", 0.3, "minimum score drawn in the overlays",
                     lower_bound=0.0, upper_bound=1.0, flag_values=fv)
  flags.DEFINE_integer("max_images", None, "stop after this many images", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_boolean("tokens", False, "also write token-selection pictures", flag_values=fv)
  flags.DEFINE_boolean("overlays", True, "write detection overlays", flag_values=fv)
  flags.DEFINE_integer("batch_size", None, "images per forward (default data.eval_batch_size)",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("num_select", None, "detections kept per image (default "
                       "model.num_select)", lower_bound=1, flag_values=fv)


def run(fv, args) -> int:
  """Predict with parsed flags; returns the exit status."""
  if args:
    raise cli.UsageError(f"unexpected arguments {args}")
  if bool(fv.checkpoint) == bool(fv.workdir):
    raise cli.UsageError("give exactly one of --checkpoint and --workdir")
  if bool(fv.split) == bool(fv.inputs):
    raise cli.UsageError("give exactly one of --inputs and --split")
  if not fv.output_dir:
    raise cli.UsageError("--output_dir is required")
  cli.configure_logging()
  # Imported once the flags are valid: usage errors and --help answer without loading jax/TF.
  from PIL import Image
  from focus_detr_jax import inference, visualize
  from focus_detr_jax.data.datasets import DataConfig
  from focus_detr_jax.models.focus_detr import FocusDETR, feature_level_shapes
  config = inference.resolve_config(fv.config, fv.workdir, fv.checkpoint)
  variables, step = inference.load_variables(fv.workdir, fv.checkpoint)
  model = FocusDETR.from_config(config.model)
  data = DataConfig.from_config(config)
  num_select = config.model.num_select if fv.num_select is None else fv.num_select
  category_ids, class_names, found = inference.category_info(data, model.num_classes)
  out = Path(fv.output_dir)
  out.mkdir(parents=True, exist_ok=True)
  if fv.overlays:
    (out / "overlays").mkdir(exist_ok=True)
  if fv.tokens:
    (out / "tokens").mkdir(exist_ok=True)
  skipped = []

  def on_error(entry, reason):
    skipped.append({"input": entry, "reason": reason})
    print(f"skipping {entry}: {reason}", file=sys.stderr)

  if fv.split:
    results = inference.predict_split(model, variables, data, fv.split,
                                      num_select=num_select, max_images=fv.max_images)
  else:
    results = inference.predict_files(model, variables, data, fv.inputs,
                                      batch_size=fv.batch_size, num_select=num_select,
                                      max_images=fv.max_images, on_error=on_error)
  source = (f"checkpoint {fv.checkpoint}" if fv.checkpoint else
            f"workdir {fv.workdir} (step {step})")
  print(f"predicting with {source} on {__import__('jax').default_backend()}", file=sys.stderr)
  start = time.time()
  detections, images = [], []
  for r in results:
    detections += inference.coco_results(r, category_ids)
    images.append({"id": r.image_id, "file_name": Path(r.path).name if r.path else r.name,
                   "height": r.orig_size[0], "width": r.orig_size[1],
                   "path": str(Path(r.path).resolve()) if r.path else None,
                   "output_name": r.name})
    if not (fv.overlays or fv.tokens):
      continue
    d = r.detections
    keep = d["valid"]
    overlay = visualize.draw_detections(r.image, d["boxes"][keep], d["scores"][keep],
                                        d["labels"][keep], class_names, fv.score_threshold)
    if fv.overlays:
      Image.fromarray(overlay).save(out / "overlays" / f"{r.name}.png")
    if fv.tokens:
      panel = visualize.token_selection_panels(
          r.image, r.maps, feature_level_shapes(*r.canvas, num_levels=model.num_levels),
          r.image_size, detections_image=overlay)
      Image.fromarray(panel).save(out / "tokens" / f"{r.name}.png")
  (out / "detections.json").write_text(json.dumps(detections))
  categories = [{"id": int(i), "name": n} for i, n in zip(category_ids, class_names)]
  (out / "images.json").write_text(json.dumps({"images": images, "categories": categories},
                                              indent=1))
  (out / "skipped.json").write_text(json.dumps(skipped, indent=1))
  shown = sum(d["score"] >= fv.score_threshold for d in detections)
  print(f"{len(images)} images in {time.time() - start:.1f} s, {len(detections)} detections "
        f"({shown} with score >= {fv.score_threshold}), {len(skipped)} inputs skipped"
        f"{'' if found else '; category_id = contiguous label (no dataset metadata)'}; "
        f"results in {out}")
  return 0 if images else 1


def main(argv=None) -> int:
  return cli.main(__doc__, define_flags, run, argv)


if __name__ == "__main__":
  cli.exit_with(main())
