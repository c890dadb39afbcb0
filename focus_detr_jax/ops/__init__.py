"""focus_detr_jax.ops."""
