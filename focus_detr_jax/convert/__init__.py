"""focus_detr_jax.convert."""
