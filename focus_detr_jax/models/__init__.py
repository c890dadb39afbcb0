"""focus_detr_jax.models."""
