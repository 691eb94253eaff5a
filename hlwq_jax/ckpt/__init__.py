"""hlwq_jax.ckpt."""
