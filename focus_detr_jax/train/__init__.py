"""focus_detr_jax.train."""
