from tkllm_ray.config.base import ConfigModel, load_config
from tkllm_ray.config.storage import StorageOptions

__all__ = ["ConfigModel", "StorageOptions", "load_config"]
