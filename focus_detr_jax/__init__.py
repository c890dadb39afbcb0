"""focus_detr_jax: Focus-DETR (ICCV 2023) in JAX/Flax, exact to the detrex reference."""

__version__ = "0.1.0"
