"""Padded pixels per training/evaluation image: detrex vs the old canvas pair vs our canvases.

  python scripts/simulate_canvases.py

Sizes only (`focus_detr_jax/data/buckets.py`: detectron2's size arithmetic and rounding, no
image decoded), 4000 image sizes of each size mix, the COCO recipe. Prints the Markdown rows of
BENCHMARKS.md, section "Canvases: padded pixels per image vs detrex (simulation)".
"""

from configs import common
from focus_detr_jax import benchmarks, cli
from focus_detr_jax.data import buckets

OLD_CANVASES = ((800, 1333), (1333, 800))


def row(name, mix, data):
  hw = buckets.size_mix_sample(mix, n=4000, seed=1)
  detrex, own = buckets.detrex_pixels_per_image(hw, data, seed=2)
  new = buckets.make_schedule(data.canvases, data.train_scales, data.scale_buckets,
                              data.group_bounds,
                              buckets.group_shares(hw, data, data.group_bounds), 0)
  old = buckets.make_schedule(OLD_CANVASES, data.train_scales, None, (1.0,), None, 0)
  so = buckets.bucketed_canvas_stats(hw, data, old, seed=3)
  sn = buckets.bucketed_canvas_stats(hw, data, new, seed=3)
  eo = buckets.eval_pixels_per_image(hw, data, OLD_CANVASES)
  en = buckets.eval_pixels_per_image(hw, data, data.eval_canvases)
  return (f"| {name} | {detrex / 1e6:.3f} M ({detrex / own:.2f}x own) | "
          f"{so.pixels_per_image / 1e6:.3f} M = **{so.pixels_per_image / detrex:.2f}x**, fill "
          f"{so.fill:.2f} | {sn.pixels_per_image / 1e6:.3f} M = "
          f"**{sn.pixels_per_image / detrex:.2f}x**, fill {sn.fill:.2f}, rescaled "
          f"{100 * sn.rescaled:.1f}% ({100 * sn.rescaled_plain:.2f}% plain, "
          f"{100 * sn.rescaled_crop:.2f}% crop) | {eo[0] / eo[1]:.2f}x | {en[0] / en[1]:.3f}x, "
          f"rescaled {100 * en[2]:.1f}% |")


def run(fv, positional):
  benchmarks.script_args(fv, positional)
  data = common.get_data_config("coco")
  print(row("COCO-like (`COCO_LIKE_SIZE_MIX`)", buckets.COCO_LIKE_SIZE_MIX, data))
  print(row("more portrait / 3:2 / 16:9 (`ALTERNATIVE_SIZE_MIX`)", buckets.ALTERNATIVE_SIZE_MIX,
            data))
  return 0


if __name__ == "__main__":
  cli.exit_with(cli.main(__doc__, lambda fv, argv: None, run))
