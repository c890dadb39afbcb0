"""Shared settings of the Swin Focus-DETR configs (spec §11.1; decisions §5 for drop path)."""

# The ImageNet weights detrex's Swin configs start from (convert/init.py says where to get them).
SWIN_BACKBONE_FILES = {
    "tiny_224": "pretrained/swin_tiny_patch4_window7_224.pth",
    "base_384": "pretrained/swin_base_patch4_window12_384_22k.pth",
    "large_384": "pretrained/swin_large_patch4_window12_384_22k.pth",
}

SWIN_VARIANTS = {
    # name: (embed_dim, depths, num_heads, window_size, drop_path_rate)
    "tiny_224": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 0.1),
    "base_384": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 0.2),
    "large_384": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 0.2),
}


def apply_swin(config, variant):
  """Switch `config.model.backbone` to a Swin variant (T=10000, offset -0.5 positions)."""
  embed_dim, depths, heads, window, drop_path = SWIN_VARIANTS[variant]
  bb = config.model.backbone
  bb.name = "swin"
  bb.embed_dim = embed_dim
  bb.depths = depths
  bb.num_heads = heads
  bb.window_size = window
  bb.drop_path_rate = drop_path
  config.init.backbone = SWIN_BACKBONE_FILES[variant]
  return config
