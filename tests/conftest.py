"""Shared test settings: float64 available, strict rank promotion, few CPU threads."""
import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
