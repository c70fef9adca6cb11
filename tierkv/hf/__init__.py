"""transformers integration: a Cache backed by tierkv's store, and the attention it registers."""
