"""Pictures of detections and of what the token selector keeps (the paper's figures 1 and 4):
uint8 RGB arrays [H, W, 3] drawn with numpy/PIL from one forward pass with the token maps
(`predict.predict_on_host`); usage and the grid's rows: docs/inference.md, section 2.

Geometry: a token (i, j) of level l (stride s = 8 * 2**l) covers network-input pixels
[i*s, (i+1)*s) x [j*s, (j+1)*s); `image_size` (h, w) is the unpadded network input inside the
canvas, and a displayed image of any size is mapped onto it (so the original image works too).
"""

import colorsys
import functools
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from focus_detr_jax.models.focus_detr import feature_level_shapes
from focus_detr_jax.predict import per_image, predict_on_host

LEVEL_COLORS = ((255, 60, 60), (255, 200, 0), (0, 210, 255), (190, 90, 255))
_TITLE_HEIGHT = 18
LEGEND_HEIGHT = 20


# ----------------------------------------------------------------------------- basics

def _as_uint8_rgb(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.stack([image] * 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
  if image.dtype != np.uint8:
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return image


def jet(values) -> np.ndarray:
  """Jet colormap of values in [0, 1] -> uint8 [..., 3]."""
  v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)[..., None]
  centres = np.asarray([3.0, 2.0, 1.0], np.float32)   # r, g, b
  rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
  return np.round(rgb * 255).astype(np.uint8)


def label_color(label: int):
  """A distinct, deterministic colour per class (golden-ratio hues)."""
  h = (0.07 + 0.618034 * int(label)) % 1.0
  r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
  return int(r * 255), int(g * 255), int(b * 255)


@functools.lru_cache(maxsize=8)
def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1: bitmap font of a fixed size
    return ImageFont.load_default()


def denormalize(image, pixel_mean, pixel_std) -> np.ndarray:
  """Network input (x - mean) / std -> uint8 RGB (padding, 0 after normalisation, goes black)."""
  image = np.asarray(image, np.float32)
  out = image * np.asarray(pixel_std, np.float32) + np.asarray(pixel_mean, np.float32)
  out = np.where(np.all(image == 0.0, axis=-1, keepdims=True), 0.0, out)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def resize(image, size_hw) -> np.ndarray:
  """uint8 RGB resize (bilinear) to (h, w)."""
  h, w = int(size_hw[0]), int(size_hw[1])
  image = _as_uint8_rgb(image)
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


# ----------------------------------------------------------------------------- detections

def _outline(canvas: np.ndarray, box, color, width: int):
  """Rectangle outline of `width` pixels inside the pixel box (x0, y0, x1, y1) (x1/y1 exclusive)."""
  h, w = canvas.shape[:2]
  x0, y0, x1, y1 = (int(round(float(v))) for v in box)
  x0, x1 = max(0, min(x0, w)), max(0, min(x1, w))
  y0, y1 = max(0, min(y0, h)), max(0, min(y1, h))
  if x1 <= x0 or y1 <= y0:
    return None
  ring = np.zeros((y1 - y0, x1 - x0), bool)
  ring[:width] = ring[-width:] = True
  ring[:, :width] = ring[:, -width:] = True
  canvas[y0:y1, x0:x1][ring] = color
  return x0, y0, x1, y1


def draw_detections(image, boxes_xyxy, scores, labels, class_names: Optional[Sequence[str]] = None,
                    score_threshold: float = 0.3, *, line_width: Optional[int] = None,
                    label_text: bool = True, max_detections: int = 100,
                    color=None) -> np.ndarray:
  """Boxes (xyxy, pixels of `image`) with `score >= score_threshold` drawn on a copy of `image`.

  Args:
    image: uint8 [H, W, 3]; boxes_xyxy: [K, 4]; scores: [K]; labels: [K] contiguous labels.
    class_names: names per label (None: the label number).
    line_width: outline width in pixels (default: 2, 3 for images over 1000 px).
    label_text: write "name score" above each box.
    color: one RGB colour for every box (default: a colour per class).
  Returns:
    uint8 [H, W, 3]. Only the outline pixels (and the label boxes) change. Highest scores are
    drawn last (on top); at most `max_detections` boxes.
  """
  out = _as_uint8_rgb(image).copy()
  boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
  scores = np.asarray(scores, np.float32).reshape(-1)
  labels = np.asarray(labels).reshape(-1).astype(np.int64)
  if line_width is None:
    line_width = 3 if max(out.shape[:2]) > 1000 else 2
  keep = np.nonzero((scores >= score_threshold) & np.all(np.isfinite(boxes), axis=1))[0]
  keep = keep[np.argsort(-scores[keep], kind="stable")][:max_detections][::-1]
  texts = []
  for k in keep:
    c = color if color is not None else label_color(labels[k])
    drawn = _outline(out, boxes[k], c, line_width)
    if drawn is not None and label_text:
      name = (class_names[labels[k]] if class_names is not None and 0 <= labels[k] < len(
          class_names) else str(labels[k]))
      texts.append((drawn, f"{name} {scores[k]:.2f}", c))
  if texts:
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil)
    font = _font(max(10, min(18, out.shape[0] // 30)))
    for (x0, y0, _, _), text, c in texts:
      l, t, r, b = draw.textbbox((0, 0), text, font=font)
      tw, th = r - l + 4, b - t + 2
      ty = y0 - th if y0 - th >= 0 else y0
      draw.rectangle([x0, ty, x0 + tw - 1, ty + th - 1], fill=c)
      draw.text((x0 + 2 - l, ty + 1 - t), text, fill=(0, 0, 0), font=font)
    out = np.asarray(pil).copy()
  return out


# ----------------------------------------------------------------------------- token geometry

def level_strides(num_levels: int = 4):
  return tuple(8 * 2 ** l for l in range(num_levels))


def split_levels(flat, level_shapes):
  """[..., N] -> list of [..., H_l, W_l] (levels finest first)."""
  flat = np.asarray(flat)
  out, start = [], 0
  for h, w in level_shapes:
    out.append(flat[..., start:start + h * w].reshape(flat.shape[:-1] + (h, w)))
    start += h * w
  if start != flat.shape[-1]:
    raise ValueError(f"{flat.shape[-1]} tokens do not match the level shapes {level_shapes}")
  return out


def fg_heatmap(image, level_scores, image_size, stride: int, *, valid=None, alpha: float = 0.55,
               normalize: bool = True) -> np.ndarray:
  """One level's foreground scores as a jet heatmap blended over `image` (same size as it).

  Args:
    image: uint8 [H, W, 3] showing the unpadded network input (any resolution).
    level_scores: [H_l, W_l] scores of the level (probabilities or logits).
    image_size: (h, w) of the unpadded network input; stride: the level's stride.
    valid: optional [H_l, W_l] bool, tokens that are not padding (used for the normalisation).
    normalize: stretch the valid tokens' scores to [0, 1] (min-max); else clip to [0, 1].
  """
  image = _as_uint8_rgb(image)
  scores = np.asarray(level_scores, np.float32)
  if valid is None:
    valid = np.ones(scores.shape, bool)
  if normalize:
    v = scores[valid] if valid.any() else scores.reshape(-1)
    lo, hi = float(v.min()), float(v.max())
    scores = (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores)
  scores = np.where(valid, scores, 0.0)
  # The level token under each display pixel.
  rows, cols = ((np.arange(d, dtype=np.float64) + 0.5) * float(size) / d
                for d, size in zip(image.shape[:2], image_size))
  rows = np.clip(np.floor(rows / stride).astype(np.int64), 0, scores.shape[0] - 1)
  cols = np.clip(np.floor(cols / stride).astype(np.int64), 0, scores.shape[1] - 1)
  heat = jet(scores[rows[:, None], cols[None, :]]).astype(np.float32)
  out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def token_dots(image, token_mask, level_shapes, image_size, *, dim: float = 0.45,
               radius: Optional[float] = None, colors=LEVEL_COLORS) -> np.ndarray:
  """Selected tokens as dots at their centres, coloured by level, over a dimmed `image`.

  Args:
    token_mask: [N] bool over every token (levels finest first); level_shapes: (H_l, W_l) per
      level of the padded canvas; image_size: (h, w) of the unpadded network input.
    radius: dot radius in display pixels (default: 0.3 of the finest stride, larger per level).
  """
  image = _as_uint8_rgb(image)
  dh, dw = image.shape[:2]
  sy, sx = dh / float(image_size[0]), dw / float(image_size[1])
  base = radius if radius is not None else max(0.8, 0.3 * 8 * min(sx, sy))
  pil = Image.fromarray(np.round(image.astype(np.float32) * dim).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  levels = split_levels(np.asarray(token_mask, bool), level_shapes)
  strides = level_strides(len(level_shapes))
  for l in range(len(level_shapes) - 1, -1, -1):   # finest level on top
    r = base * (1.0 + 0.35 * l)
    ii, jj = np.nonzero(levels[l])
    cx = np.minimum((jj + 0.5) * strides[l], image_size[1] - 0.5) * sx
    cy = np.minimum((ii + 0.5) * strides[l], image_size[0] - 0.5) * sy
    for x, y in zip(cx, cy):
      draw.ellipse([x - r, y - r, x + r, y + r], fill=colors[l % len(colors)])
  return np.asarray(pil).copy()


# ----------------------------------------------------------------------------- grids

def compose_grid(panels: Sequence[np.ndarray], titles: Sequence[str], columns: int,
                 cell_hw=None, background=(24, 24, 24)) -> np.ndarray:
  """Panels (resized to fit a cell, aspect kept) with a title strip above each, row-major.

  A None panel leaves its cell empty.
  """
  if not any(p is not None for p in panels):
    raise ValueError("no panels")
  if cell_hw is None:
    cell_hw = (max(p.shape[0] for p in panels if p is not None),
               max(p.shape[1] for p in panels if p is not None))
  ch, cw = cell_hw
  rows = -(-len(panels) // columns)
  gh, gw = ch + _TITLE_HEIGHT, cw
  grid = Image.new("RGB", (columns * gw, rows * gh), background)
  draw = ImageDraw.Draw(grid)
  font = _font(12)
  for k, (panel, title) in enumerate(zip(panels, titles)):
    if panel is None:
      continue
    r, c = divmod(k, columns)
    panel = _as_uint8_rgb(panel)
    scale = min(ch / panel.shape[0], cw / panel.shape[1])
    ph, pw = max(1, int(round(panel.shape[0] * scale))), max(1, int(round(panel.shape[1] * scale)))
    grid.paste(Image.fromarray(resize(panel, (ph, pw))), (c * gw, r * gh + _TITLE_HEIGHT))
    draw.text((c * gw + 3, r * gh + 2), title, fill=(235, 235, 235), font=font)
  return np.asarray(grid).copy()


def legend_strip(width: int, num_levels: int = 4, background=(24, 24, 24)) -> np.ndarray:
  """uint8 [LEGEND_HEIGHT, width, 3]: the heatmap colour scale and the dot colour of each level.

  `fg score: low [blue..red] high | dots = token centres: s8 s16 s32 s64` (each stride in its
  level's colour).
  """
  strip = Image.new("RGB", (width, LEGEND_HEIGHT), background)
  draw = ImageDraw.Draw(strip)
  font = _font(12)
  x = 4

  def text(s, color=(235, 235, 235)):
    nonlocal x
    draw.text((x, 3), s, fill=color, font=font)
    x += int(draw.textlength(s, font=font)) + 6

  text("fg score: low")
  bar = jet(np.linspace(0.0, 1.0, 60))[None].repeat(LEGEND_HEIGHT - 8, axis=0)
  strip.paste(Image.fromarray(bar), (x, 4))
  x += 66
  text("high  |  dots = token centres by level:")
  for stride, color in zip(level_strides(num_levels), LEVEL_COLORS):
    draw.ellipse((x, 6, x + 8, 14), fill=color)
    x += 11
    text(f"s{stride}", color)
  return np.asarray(strip).copy()


def token_selection_panels(image, intermediates: Mapping[str, Any], level_shapes, image_size, *,
                           detections_image=None, panel_size: int = 320,
                           normalize: bool = True, legend: bool = True) -> np.ndarray:
  """The figure-1/4 grid of one image: foreground heatmaps, updated tokens, object tokens.

  Row 1: the image (or `detections_image`) and one foreground-score heatmap per level.
  Row 2: per encoder layer, the tokens it updates (dots coloured by level).
  Row 3: per encoder layer, the object tokens (OESM top-k by multi-category score).

  Args:
    image: uint8 [H, W, 3] showing the unpadded network input (the original image works).
    intermediates: one image's arrays (see module doc): `fg_score` [N] logits, optional
      `token_valid` [N], `updated` [E, N] bool, `objects` [E, N] bool.
    level_shapes: (H_l, W_l) of the canvas levels (`feature_level_shapes(H, W)`).
    image_size: (h, w) of the unpadded network input.
    panel_size: longest side of each panel in pixels.
    legend: add `legend_strip` below the grid (what the heatmap and dot colours mean).
  Returns:
    uint8 grid [rows * (cell_h + title) (+ LEGEND_HEIGHT), columns * cell_w, 3].
  """
  image = _as_uint8_rgb(image)
  scale = panel_size / max(image.shape[:2])
  disp_hw = (max(1, int(round(image.shape[0] * scale))), max(1, int(round(image.shape[1] * scale))))
  disp = resize(image, disp_hw)
  num_levels = len(level_shapes)
  strides = level_strides(num_levels)
  fg = 1.0 / (1.0 + np.exp(-np.asarray(intermediates["fg_score"], np.float64)))
  token_valid = np.asarray(intermediates.get("token_valid", np.ones(fg.shape[-1], bool)), bool)
  fg_levels = split_levels(fg, level_shapes)
  valid_levels = split_levels(token_valid, level_shapes)
  panels = [resize(detections_image, disp_hw) if detections_image is not None else disp]
  titles = ["detections" if detections_image is not None else "image"]
  for l in range(num_levels):
    panels.append(fg_heatmap(disp, fg_levels[l], image_size, strides[l], valid=valid_levels[l],
                             normalize=normalize))
    v = fg_levels[l][valid_levels[l]]
    rng = f" {v.min():.2f}-{v.max():.2f}" if v.size else ""
    titles.append(f"fg score L{l} (s{strides[l]}){rng}")
  rows = [(panels, titles)]
  for key, name in (("updated", "updated"), ("objects", "object tokens")):
    masks = np.asarray(intermediates[key], bool) & token_valid
    rows.append(([token_dots(disp, m, level_shapes, image_size) for m in masks],
                 [f"enc {e}: {name} {int(m.sum())}" for e, m in enumerate(masks)]))
  columns = max(len(panels), len(rows[1][0]))
  all_p, all_t = [], []
  for row_p, row_t in rows:   # each row starts a new grid row
    all_p += row_p + [None] * (columns - len(row_p))
    all_t += row_t + [""] * (columns - len(row_t))
  grid = compose_grid(all_p, all_t, columns, cell_hw=disp_hw)
  if legend:
    grid = np.concatenate([grid, legend_strip(grid.shape[1], num_levels)], axis=0)
  return grid


# ----------------------------------------------------------------------------- TensorBoard

def training_images(model, variables, batch, data, num_select: int, max_images: int = 2,
                    class_names: Optional[Sequence[str]] = None,
                    score_threshold: float = 0.3) -> Dict[str, np.ndarray]:
  """TensorBoard images of an eval-style batch: detections and token-selection grids.

  Args:
    batch: a batch of `iterators.make_eval_iterator` (image, pixel_valid, image_size, and
      optionally boxes/labels/box_valid ground truth and example_valid).
    data: the `datasets.DataConfig` of the batch (its `pixel_mean/std`); num_select:
      detections per image (`config.model.num_select`).
    max_images: images drawn (the first valid ones; always this many forward slots, so the
      forward compiles once per canvas).
  Returns:
    {"detections": uint8 [n, H, W, 3] (canvas size; ground truth white, predictions coloured),
     "token_selection": uint8 [n, H', W', 3]}; empty if the batch has no valid example.
  """
  images = np.asarray(batch["image"])
  valid = np.asarray(batch.get("example_valid", np.ones(images.shape[0], bool)), bool)
  chosen = np.nonzero(valid)[0][:max_images]
  if chosen.size == 0:
    return {}
  slots = min(max_images, images.shape[0])
  idx = np.concatenate([chosen, np.repeat(chosen[-1:], slots - chosen.size)])
  sizes = np.asarray(batch["image_size"], np.int32)[idx]
  dets, maps = predict_on_host(model, variables, images[idx],
                               np.asarray(batch["pixel_valid"])[idx], sizes,
                               num_select=num_select)
  canvas_hw = images.shape[1:3]
  level_shapes = feature_level_shapes(*canvas_hw, num_levels=model.num_levels)
  det_images, token_images = [], []
  for i in range(chosen.size):
    plain = denormalize(images[idx[i]], data.pixel_mean, data.pixel_std)
    shown = plain
    h, w = (int(v) for v in sizes[i])
    if "boxes" in batch and "box_valid" in batch:
      gt = np.asarray(batch["boxes"])[idx[i]][np.asarray(batch["box_valid"])[idx[i]]]
      gt_xyxy = np.concatenate([gt[:, :2] - gt[:, 2:] / 2, gt[:, :2] + gt[:, 2:] / 2],
                               -1) * np.asarray([w, h, w, h], np.float32)
      shown = draw_detections(shown, gt_xyxy, np.ones(len(gt)), np.zeros(len(gt), int),
                              score_threshold=0.0, line_width=1, label_text=False,
                              color=(255, 255, 255))
    keep = dets["valid"][i]
    drawn = draw_detections(shown, dets["boxes"][i][keep], dets["scores"][i][keep],
                            dets["labels"][i][keep], class_names, score_threshold)
    det_images.append(drawn)
    token_images.append(token_selection_panels(
        plain[:h, :w], per_image(maps, i), level_shapes, (h, w), detections_image=drawn[:h, :w],
        panel_size=max(64, min(256, max(canvas_hw)))))
  th = max(t.shape[0] for t in token_images)
  tw = max(t.shape[1] for t in token_images)
  token_images = [np.pad(t, ((0, th - t.shape[0]), (0, tw - t.shape[1]), (0, 0)))
                  for t in token_images]
  return {"detections": np.stack(det_images), "token_selection": np.stack(token_images)}
