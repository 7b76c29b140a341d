from tkllm_ray.models.presets import PRESETS, build_model, fingerprint, preset_config

__all__ = ["PRESETS", "build_model", "fingerprint", "preset_config"]
