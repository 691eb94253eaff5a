"""hlwq_jax.eval: evaluation data and perplexity protocols."""
