"""focus_detr_jax.parity."""
