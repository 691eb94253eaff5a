"""hlwq_jax.models."""
