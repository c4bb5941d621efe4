"""lora_jax."""
