"""focus_detr_jax.evaluation."""
