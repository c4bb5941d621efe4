"""Speed and memory of lora_jax against HF PEFT + PyTorch, and against the machine's own matmul peak.

Entry point: `python benchmarks/run.py` (see benchmarks/README.md). Not part of the library: it may import torch.
"""
