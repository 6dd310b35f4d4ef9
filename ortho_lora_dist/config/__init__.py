"""The typed run configuration: YAML (safe_load) + ``key.sub=value`` overrides, validated by pydantic
before anything heavy loads. An unknown key is an error naming it and the closest valid key; a wrong
type names the key and the expected type. The resolved config is saved with every checkpoint.
"""

from ortho_lora_dist.config.load import ConfigError, load_config, resolve_paths, validate_config
from ortho_lora_dist.config.model import LoraConfigModel, ModelConfig
from ortho_lora_dist.config.schema import Config, eval_batch_size
from ortho_lora_dist.config.task import GenerationOptions, TaskConfig
from ortho_lora_dist.config.train import DistributedConfig, TrainConfig, missing_trackers

__all__ = [
    "Config",
    "ConfigError",
    "DistributedConfig",
    "GenerationOptions",
    "LoraConfigModel",
    "ModelConfig",
    "TaskConfig",
    "TrainConfig",
    "eval_batch_size",
    "load_config",
    "missing_trackers",
    "resolve_paths",
    "validate_config",
]
