"""Focus-DETR (detrex `FOCUS_DETR` + `FOCUS_DETRTransformer`), composed from the model files.

    images -> backbone -> neck (4 levels) -> masks, sine positions, level embeddings
      -> Foreground Token Selector scores -> fixed-capacity cascade of top-k token sets
      -> dual-attention encoder (OESM self-attention + deformable attention on selected tokens)
      -> two-stage top-Q proposals -> DINO decoder (+ optional denoising queries) -> heads

One jit compilation per padded input shape: every size here is static (decisions §2-3), dynamic
counts are masks. Teacher forcing (decisions §8) replaces the three data-dependent top-k's with
given indices. Intermediates for parity checks are `sow`n into the `intermediates` collection.
"""

import dataclasses
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from focus_detr_jax.models import remat, token_selection
from focus_detr_jax.models.decoder import DecoderLayer
from focus_detr_jax.models.deformable_attention import resolve_implementation
from focus_detr_jax.models.encoder import FocusEncoderLayer
from focus_detr_jax.models.layers import (MLP, TORCH_LINEAR_KERNEL, gather_rows, island_dtype,
                                          layer_norm, scatter_rows)
from focus_detr_jax.models.neck import ChannelMapper
from focus_detr_jax.models.resnet import ResNet
from focus_detr_jax.models.swin import SwinTransformer
from focus_detr_jax.models.position import sine_box_embedding, sine_position_embedding
from focus_detr_jax.ops import exact
from focus_detr_jax.ops.boxes import inverse_sigmoid

_PRIOR_PROB_BIAS = -math.log((1 - 0.01) / 0.01)


def feature_level_shapes(height: int, width: int, num_levels: int = 4):
  """Static (H_l, W_l) of the neck levels (strides 8, 16, 32, 64) for a padded input size.

  Every stride-2 stage (convs with padding, Swin patch merging) rounds up.
  """
  h, w = height, width
  shapes = []
  for _ in range(3):
    h, w = -(-h // 2), -(-w // 2)
  for _ in range(num_levels):
    shapes.append((h, w))
    h, w = -(-h // 2), -(-w // 2)
  return tuple(shapes)


def nearest_source_indices(in_size: int, out_size: int) -> np.ndarray:
  """torch `F.interpolate(mode="nearest", size=...)` source index of each output cell (host).

  torch: identity when the sizes are equal, else `min(floor(dst * scale), in - 1)` with
  `scale = float(in) / out` and the product in float32.
  """
  if in_size == out_size:
    return np.arange(out_size, dtype=np.int32)
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(src, in_size - 1)


def nearest_resize_mask(mask, out_hw):
  """torch F.interpolate(mode="nearest") of a [B, H, W] bool mask -> [B, H_l, W_l] (a gather,
  so either polarity)."""
  rows = nearest_source_indices(mask.shape[1], out_hw[0])
  cols = nearest_source_indices(mask.shape[2], out_hw[1])
  return mask[:, rows][:, :, cols]


def level_valid_counts(level_valid):
  """Valid rows and columns of a [B, H, W] validity mask (True = valid), read like detrex from
  the first column and the first row: (valid_h [B], valid_w [B]) int32."""
  valid_h = level_valid[:, :, 0].sum(axis=1).astype(jnp.int32)
  valid_w = level_valid[:, 0, :].sum(axis=1).astype(jnp.int32)
  return valid_h, valid_w


def grid_axis_proposals(valid_counts, size: int, dtype=jnp.float32):
  """One axis of detrex's grid proposals, bit-exact on every backend.

  The coordinate `(i + 0.5) / valid`, its `(0.01, 0.99)` validity and its log-odds come from
  host tables in IEEE float32 (ops/exact.py says why a division in the program is not enough).

  Args:
    valid_counts: [B] int32 valid cells along the axis (0..size).
  Returns:
    unact [B, size] `dtype` log-odds of the coordinate, valid [B, size] bool.
  """
  coords = exact.grid_axis_table(size, dtype)
  valid = exact.open_interval(coords, 0.01, 0.99)
  with np.errstate(divide="ignore", invalid="ignore"):
    unact = np.log(coords / (coords.dtype.type(1) - coords))
  unact = np.where(valid, unact, np.inf).astype(coords.dtype)
  return jnp.asarray(unact)[valid_counts], jnp.asarray(valid)[valid_counts]


def encoder_proposals(level_valid, spatial_shapes, dtype=jnp.float32):
  """detrex/DINO grid proposals of every token.

  Args:
    level_valid: list of [B, H_l, W_l] bool, True = valid.
    dtype: float dtype of the proposals (float32; float64 in the float64 numerics mode).
  Returns:
    proposals_unact [B, N, 4] (log-odds cxcywh; +inf where invalid or padded),
    valid [B, N] bool (all four coordinates in (0.01, 0.99) and not padded).
  """
  unacts, valids = [], []
  for lvl, (lvl_valid, (h, w)) in enumerate(zip(level_valid, spatial_shapes)):
    b = lvl_valid.shape[0]
    valid_h, valid_w = level_valid_counts(lvl_valid)
    cy, cy_valid = grid_axis_proposals(valid_h, h, dtype)                       # [B, H]
    cx, cx_valid = grid_axis_proposals(valid_w, w, dtype)                       # [B, W]
    # w = h = 0.05 * 2^lvl (torch: ones * 0.05 * 2.0**lvl in float32).
    size = np.asarray(np.dtype(dtype).type(0.05) * np.dtype(dtype).type(2.0 ** lvl))
    size_valid = bool(exact.open_interval(size, 0.01, 0.99))
    size_unact = np.log(size / (size.dtype.type(1) - size)) if size_valid else np.inf
    size_unact = jnp.full((b, h, w), size_unact, dtype)
    unact = jnp.stack([jnp.broadcast_to(cx[:, None, :], (b, h, w)),
                       jnp.broadcast_to(cy[:, :, None], (b, h, w)), size_unact, size_unact], -1)
    valid = cy_valid[:, :, None] & cx_valid[:, None, :] & size_valid & lvl_valid
    unacts.append(unact.reshape(b, h * w, 4))
    valids.append(valid.reshape(b, h * w))
  valid = jnp.concatenate(valids, axis=1)
  unact = jnp.where(valid[..., None], jnp.concatenate(unacts, axis=1), jnp.inf)
  return unact, valid


def level_valid_ratios(level_valid, dtype=jnp.float32):
  """detrex valid ratios `(valid_w / W_l, valid_h / H_l)` per level (`level_valid`: list of
  [B, H_l, W_l] bool, True = valid): [B, L, 2] `dtype`, the quotients gathered from host tables
  (bit-exact on every backend)."""
  ratios = []
  for valid in level_valid:
    valid_h, valid_w = level_valid_counts(valid)
    ratios.append(jnp.stack(
        [jnp.asarray(exact.ratio_table(valid.shape[2], dtype))[valid_w],
         jnp.asarray(exact.ratio_table(valid.shape[1], dtype))[valid_h]], axis=-1))
  return jnp.stack(ratios, axis=1)


def encoder_reference_points(spatial_shapes, valid_ratios):
  """2-d reference points of every token: [B, N, L, 2] (x, y), spec §6.

  `(i + 0.5) / (valid_ratio * H_l)` divides by a broadcast value, which XLA would turn into a
  multiplication by its reciprocal: `exact_divide` keeps torch's rounding.
  """
  refs = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    ry, rx = jnp.meshgrid(jnp.arange(h, dtype=valid_ratios.dtype) + 0.5,
                          jnp.arange(w, dtype=valid_ratios.dtype) + 0.5, indexing="ij")
    ry = exact.exact_divide(ry.reshape(-1)[None], valid_ratios[:, None, lvl, 1] * h)
    rx = exact.exact_divide(rx.reshape(-1)[None], valid_ratios[:, None, lvl, 0] * w)
    refs.append(jnp.stack([rx, ry], axis=-1))
  refs = jnp.concatenate(refs, axis=1)
  return refs[:, :, None] * valid_ratios[:, None]


# config.model.dtype -> compute dtype. float64 is a numerics mode for parity studies (every
# float32 island becomes float64 too); it needs 64-bit JAX (JAX_ENABLE_X64=1).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def compute_dtype(name):
  """`config.model.dtype` name -> jnp dtype, with a clear error for unknown names."""
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"model.dtype={name!r}: expected one of {sorted(COMPUTE_DTYPES)}")
  return COMPUTE_DTYPES[name]


def _uniform(low, high):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, low, high)
  return init


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """`config.model.backbone` read once: frozen and hashable, so that the model built from it is
  a valid static argument of `jax.jit`. The defaults live in configs/common.py only."""
  name: str                       # "resnet" | "swin"
  depth: int                      # resnet
  norm: str
  freeze_at: int
  base_width: int
  embed_dim: int                  # swin
  depths: Tuple[int, ...]
  num_heads: Tuple[int, ...]
  window_size: int
  drop_path_rate: float

  @classmethod
  def from_config(cls, backbone_config) -> "BackboneConfig":
    values = {f.name: backbone_config[f.name] for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()})


# Input traced for shapes / init (variable shapes do not depend on it): large enough that every
# level has more tokens than the 900 queries and the 300 OESM tokens of the standard configs.
INIT_IMAGE_SIZE = (320, 480)
SKIP_COLLECTIONS = ("intermediates",)   # sown activations, not variables


def init_variables(model, rng, image_size=INIT_IMAGE_SIZE) -> Dict[str, Any]:
  """The model's variables (`params`, `frozen`; no sown intermediates) for PRNG key `rng`.

  The init is jitted with the forward pass dead-code-eliminated; on CPU it is compiled without
  backend optimisation (the init runs once, compiling it fully takes several times longer).
  """
  height, width = image_size

  def init(key):
    v = model.init(key, jnp.zeros((1, height, width, 3), jnp.float32),
                   jnp.zeros((1, height, width), bool))
    return {c: v[c] for c in v if c not in SKIP_COLLECTIONS}

  lowered = jax.jit(init).lower(rng)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
  return compiled(rng)


class FocusDETR(nn.Module):
  """Focus-DETR detector. Build with `FocusDETR.from_config(config.model)`.

  Attributes mirror `config.model` (configs/common.py).
  """
  num_classes: int = 80
  backbone: Optional[BackboneConfig] = None   # required: build with `from_config`
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  num_levels: int = 4
  num_points: int = 4
  num_queries: int = 900
  topk_sa: int = 300
  focus_rho: float = 0.5
  cascade: Sequence[float] = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
  pos_temperature: float = 10000.0
  pos_offset: float = -0.5
  eval_padding_mask: bool = True
  batch_group_size: int = 2
  dtype: Any = jnp.float32
  remat: str = "none"                      # models/remat.py: what the backward recomputes
  msda_implementation: str = "auto"        # deformable_attention.py: the formulation

  @classmethod
  def from_config(cls, model_config):
    """The one place where `config.model` becomes constructor arguments."""
    c = model_config
    if len(c.cascade) != c.num_encoder_layers:
      raise ValueError(f"model.cascade has {len(c.cascade)} entries for "
                       f"{c.num_encoder_layers} encoder layers")
    if c.num_levels != 4:
      raise ValueError("Focus-DETR's top-down score modulation is defined for exactly 4 levels")
    resolve_implementation(c.msda_implementation)   # an unknown formulation fails here
    values = {f.name: c[f.name] for f in dataclasses.fields(cls)
              if f.name not in ("parent", "name")}               # flax's own fields
    return cls(**dict(values, backbone=BackboneConfig.from_config(c.backbone),
                      cascade=tuple(c.cascade), dtype=compute_dtype(c.dtype)))

  def setup(self):
    d, dt = self.hidden_dim, self.dtype
    bb = self.backbone
    if bb is None:
      raise ValueError("FocusDETR needs its backbone settings: build it with "
                       "FocusDETR.from_config(config.model)")
    if bb.name == "resnet":
      self.backbone_net = ResNet(depth=bb.depth, norm=bb.norm, freeze_at=bb.freeze_at,
                                 base_width=bb.base_width, dtype=dt, remat=self.remat,
                                 name="backbone")
    elif bb.name == "swin":
      self.backbone_net = SwinTransformer(
          embed_dim=bb.embed_dim, depths=bb.depths, num_heads=bb.num_heads,
          window_size=bb.window_size, drop_path_rate=bb.drop_path_rate, dtype=dt,
          remat=self.remat, name="backbone")
    else:
      raise ValueError(f"unknown backbone {bb.name!r}; expected 'resnet' or 'swin'")
    self.neck = ChannelMapper(d, self.num_levels, dtype=dt)
    self.level_embeds = self.param("level_embeds", nn.initializers.normal(1.0),
                                   (self.num_levels, d))
    self.alpha = self.param("alpha", _uniform(-0.3, 0.3), (self.num_levels - 1,))
    self.enc_output = nn.Dense(d, kernel_init=nn.initializers.xavier_uniform(), dtype=dt)
    self.enc_output_norm = layer_norm(dtype=dt)
    self.enc_mask_predictor = token_selection.MaskPredictor(d, dtype=dt)
    self.tgt_embed = self.param("tgt_embed", nn.initializers.xavier_uniform(),
                                (self.num_queries, d))
    self.label_enc = self.param("label_enc", nn.initializers.normal(1.0), (self.num_classes, d))
    layer_args = dict(embed_dim=d, num_heads=self.num_heads, ffn_dim=self.ffn_dim,
                      num_levels=self.num_levels, num_points=self.num_points, dtype=dt,
                      msda_implementation=self.msda_implementation)
    # Rematerialised layers keep their names and parameters (static: spatial_shapes).
    encoder_layer = remat.wrap(FocusEncoderLayer, self.remat, "encoder", static_argnums=(9,))
    decoder_layer = remat.wrap(DecoderLayer, self.remat, "decoder", static_argnums=(6,))
    self.encoder_layers = [encoder_layer(topk_sa=self.topk_sa, **layer_args)
                           for _ in range(self.num_encoder_layers)]
    self.decoder_layers = [decoder_layer(**layer_args) for _ in range(self.num_decoder_layers)]
    self.ref_point_head = MLP(d, d, 2, dtype=dt, xavier=True)   # in detrex's transformer
    self.decoder_norm = layer_norm(dtype=dt)
    # 7 class/box heads: 0..L-1 decoder layers, L = two-stage proposals and the encoder's MCSP.
    # Heads as detrex builds them: torch Linear default kernels, the prior-probability bias on
    # the class heads, zeros on the last box layer.
    self.class_embed = [nn.Dense(self.num_classes, dtype=dt, kernel_init=TORCH_LINEAR_KERNEL,
                                 bias_init=nn.initializers.constant(_PRIOR_PROB_BIAS))
                        for _ in range(self.num_decoder_layers + 1)]
    self.bbox_embed = [MLP(d, 4, 3, dtype=dt, last_zero_init=True)
                       for _ in range(self.num_decoder_layers + 1)]

  def __call__(self, images, pixel_valid=None, *, train: bool = False,
               denoising: Optional[Dict[str, jnp.ndarray]] = None,
               forced: Optional[Dict[str, Any]] = None):
    """Run the detector.

    Args:
      images: [B, H, W, 3] normalised, zero-padded after normalisation.
      pixel_valid: [B, H, W] bool, True = image pixel, False = padding (None: no padding).
      train: training mode (masks always on, batch groups of `batch_group_size`, drop path).
      denoising: optional CDN queries: `labels` [B, S] int, `boxes_unact` [B, S, 4],
        `attn_mask` [B, S+Q, S+Q] bool (True = blocked), `valid` [B, S] bool (filled slots).
      forced: optional teacher-forced indices: `fg_inds` (tuple of [B, K_l]), `oesm_sel_local`
        (tuple of [B, S_l]), `enc_topk_proposals` [B, Q].
    Returns:
      dict: pred_logits [B,Q,C], pred_boxes [B,Q,4], aux_pred_logits [L-1,B,Q,C],
      aux_pred_boxes [L-1,B,Q,4], enc_pred_logits [B,Q,C], enc_pred_boxes [B,Q,4],
      init_reference [B,Q,4], inter_references [L,B,Q,4], fg_score [B,N], token_valid [B,N],
      enc_topk_proposals [B,Q]; with denoising also dn_pred_logits [L,B,S,C], dn_pred_boxes.
    """
    if jnp.dtype(self.dtype) == jnp.float64 and not jax.config.jax_enable_x64:
      # Without x64, float64 requests silently become float32: refuse instead.
      raise ValueError("model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
                       "jax.config.update('jax_enable_x64', True) before tracing the model")
    forced = forced or {}
    b = images.shape[0]
    use_mask = (train or self.eval_padding_mask) and pixel_valid is not None
    # Batch groups couple images like one detrex per-GPU batch in training; never at inference.
    group_size = self.batch_group_size if train else 1

    features = self.backbone_net(images.astype(self.dtype), train=train)
    srcs = self.neck(features)
    spatial_shapes = tuple((int(s.shape[1]), int(s.shape[2])) for s in srcs)
    self.sow("intermediates", "backbone_features", tuple(features))
    self.sow("intermediates", "neck_features", tuple(srcs))

    # Masks, positions, flattening (spec §1.4).
    image_valid = pixel_valid if use_mask else jnp.ones(images.shape[:3], bool)
    level_valid = [nearest_resize_mask(image_valid, hw) for hw in spatial_shapes]
    acc = island_dtype(self.dtype)
    pos = [sine_position_embedding(m, self.hidden_dim // 2, self.pos_temperature, self.pos_offset,
                                   dtype=acc) for m in level_valid]
    self.sow("intermediates", "pos_embed", tuple(pos))
    feat_flat = jnp.concatenate([s.reshape(b, -1, self.hidden_dim) for s in srcs], axis=1)
    token_valid = jnp.concatenate([m.reshape(b, -1) for m in level_valid], axis=1)
    lvl_pos = jnp.concatenate(
        [(p + self.level_embeds[l]).reshape(b, -1, self.hidden_dim) for l, p in enumerate(pos)],
        axis=1).astype(self.dtype)
    valid_ratios = level_valid_ratios(level_valid, acc)                            # [B, L, 2]
    num_tokens = feat_flat.shape[1]
    if num_tokens < self.num_queries:
      raise ValueError(f"input {images.shape[1:3]} gives {num_tokens} tokens, fewer than "
                       f"num_queries={self.num_queries}; use a larger canvas or fewer queries")

    # Foreground Token Selector (spec §2).
    proposals_unact, proposals_valid = encoder_proposals(level_valid, spatial_shapes, acc)
    fts_memory = self.enc_output_norm(self.enc_output(
        jnp.where(proposals_valid[..., None], feat_flat + lvl_pos, 0.0)))
    fg_score, _ = token_selection.foreground_scores(self.enc_mask_predictor, self.alpha,
                                                    fts_memory, spatial_shapes)
    valid_token_nums = token_valid.sum(axis=1).astype(jnp.int32)
    fg_masked = token_selection.fill_padded_scores(fg_score, token_valid, group_size)
    focus_nums, layer_counts = token_selection.focus_counts(
        valid_token_nums, self.focus_rho, self.cascade, group_size)
    capacities = token_selection.cascade_capacities(num_tokens, self.focus_rho, self.cascade)
    if "fg_inds" in forced:
      fg_inds = [jnp.asarray(i, jnp.int32) for i in forced["fg_inds"]]
    else:
      _, ranking = jax.lax.top_k(fg_masked, capacities[0])
      fg_inds = [ranking[:, :k] for k in capacities]
    for name, value in dict(fts_memory_rownorm=jnp.linalg.norm(fts_memory, axis=-1),
                            fg_score=fg_score, fg_score_masked=fg_masked,
                            valid_token_nums=valid_token_nums, focus_token_nums=focus_nums,
                            layer_counts=layer_counts, valid_ratios=valid_ratios,
                            token_valid=token_valid, proposals_valid=proposals_valid).items():
      self.sow("intermediates", name, value)

    # Dual-attention encoder on the cascade (spec §5).
    ref_points = encoder_reference_points(spatial_shapes, valid_ratios)
    output = feat_flat
    mcsp_head = self.class_embed[self.num_decoder_layers]
    for l, layer in enumerate(self.encoder_layers):
      idx = fg_inds[l]
      k = idx.shape[1]
      rows = jnp.arange(k)[None, :]
      candidate_valid = rows < layer_counts[:, l:l + 1]
      write_back = rows < jnp.minimum(focus_nums, layer_counts[:, l])[:, None]
      query = gather_rows(output, idx)
      forced_sel = forced["oesm_sel_local"][l] if "oesm_sel_local" in forced else None
      updated, info = layer(query, gather_rows(lvl_pos, idx), gather_rows(ref_points, idx),
                            gather_rows(fg_masked, idx), candidate_valid,
                            gather_rows(token_valid, idx), feat_flat, token_valid, spatial_shapes,
                            mcsp_head, forced_sel)
      output = scatter_rows(output, idx, jnp.where(write_back[..., None], updated, query))
      info = dict(info, fg_inds=idx, out_rownorm=jnp.linalg.norm(updated, axis=-1))
      self.sow("intermediates", f"encoder_layer{l}", info)
    memory = output if "memory" not in forced else jnp.asarray(forced["memory"])
    self.sow("intermediates", "memory", memory)

    # Two-stage query selection (spec §7.1).
    output_memory = self.enc_output_norm(self.enc_output(
        jnp.where(proposals_valid[..., None], memory, 0.0)))
    enc_class = mcsp_head(output_memory).astype(acc)
    enc_coord_unact = (self.bbox_embed[self.num_decoder_layers](output_memory).astype(acc)
                       + proposals_unact)
    enc_class_max = enc_class.max(axis=-1)
    self.sow("intermediates", "enc_outputs_class_max_all", enc_class_max)
    if "enc_topk_proposals" in forced:
      topk_proposals = jnp.asarray(forced["enc_topk_proposals"], jnp.int32)
    else:
      _, topk_proposals = jax.lax.top_k(enc_class_max, self.num_queries)
    topk_coords_unact = gather_rows(enc_coord_unact, topk_proposals)
    target_unact = gather_rows(output_memory, topk_proposals)
    enc_pred_logits = mcsp_head(target_unact).astype(acc)
    enc_pred_boxes = jax.nn.sigmoid(topk_coords_unact)
    reference = jax.lax.stop_gradient(enc_pred_boxes)
    target = jnp.broadcast_to(self.tgt_embed[None], (b,) + self.tgt_embed.shape).astype(self.dtype)
    attn_mask = None
    num_dn = 0
    if denoising is not None:
      dn_labels = denoising["labels"]
      num_dn = dn_labels.shape[1]
      dn_target = jnp.take(self.label_enc, dn_labels, axis=0).astype(self.dtype)
      if "valid" in denoising:  # detrex leaves unfilled slots as zero vectors
        dn_target = jnp.where(denoising["valid"][..., None], dn_target, 0.0)
      target = jnp.concatenate([dn_target, target], axis=1)
      reference = jnp.concatenate([jax.nn.sigmoid(denoising["boxes_unact"]), reference], axis=1)
      attn_mask = denoising["attn_mask"]
    # Keep label_enc in the gradient graph even without denoising (detrex's DDP hack, no effect).
    target = target + (self.label_enc[0, 0] * 0.0).astype(target.dtype)

    # Decoder with look-forward-twice box refinement (spec §7.2).
    init_reference = reference
    vr4 = jnp.concatenate([valid_ratios, valid_ratios], axis=-1)                   # [B, L, 4]
    x = target
    hidden, references = [], []
    for l, layer in enumerate(self.decoder_layers):
      ref_in = reference[:, :, None] * vr4[:, None]
      query_pos = self.ref_point_head(
          sine_box_embedding(ref_in[:, :, 0, :], self.hidden_dim // 2).astype(self.dtype))
      x = layer(x, query_pos, memory, token_valid, ref_in, spatial_shapes, attn_mask)
      new_reference = jax.nn.sigmoid(self.bbox_embed[l](x).astype(acc)
                                     + inverse_sigmoid(reference))
      hidden.append(self.decoder_norm(x))
      references.append(new_reference)
      reference = jax.lax.stop_gradient(new_reference)

    logits, boxes = [], []
    for l in range(self.num_decoder_layers):
      ref_l = init_reference if l == 0 else references[l - 1]
      logits.append(self.class_embed[l](hidden[l]).astype(acc))
      boxes.append(jax.nn.sigmoid(self.bbox_embed[l](hidden[l]).astype(acc)
                                  + inverse_sigmoid(ref_l)))
    logits = jnp.stack(logits)
    boxes = jnp.stack(boxes)
    inter_references = jnp.stack(references)
    self.sow("intermediates", "dec_hidden_rownorm",
             jnp.stack([jnp.linalg.norm(h[:, num_dn:], axis=-1) for h in hidden]))
    outputs = dict(
        pred_logits=logits[-1, :, num_dn:], pred_boxes=boxes[-1, :, num_dn:],
        aux_pred_logits=logits[:-1, :, num_dn:], aux_pred_boxes=boxes[:-1, :, num_dn:],
        enc_pred_logits=enc_pred_logits, enc_pred_boxes=enc_pred_boxes,
        init_reference=init_reference[:, num_dn:], inter_references=inter_references[:, :, num_dn:],
        fg_score=fg_score, token_valid=token_valid, enc_topk_proposals=topk_proposals)
    if denoising is not None:
      outputs["dn_pred_logits"] = logits[:, :, :num_dn]
      outputs["dn_pred_boxes"] = boxes[:, :, :num_dn]
    return outputs
