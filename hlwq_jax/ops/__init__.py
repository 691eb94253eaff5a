"""hlwq_jax.ops."""
