"""The packed launcher plugin: a regular package, so Hydra's scan of the hydra_plugins namespace walks into it."""
