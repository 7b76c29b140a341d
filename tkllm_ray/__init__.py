"""tkllm-ray: per-creator sparse-delta fine-tuning and serving of a shared base LLM on Ray."""

__version__ = "0.1.0"
