"""focus_detr_jax.data."""
