"""Config: the typed schema, YAML merge, validation, and the DeepSpeed JSON made from it."""

from megatron.config.errors import ConfigError, ConfigIssue
from megatron.config.loader import LoadedConfig, build_config, load_config, load_resolved, save_resolved
from megatron.config.schema import NeoXConfig

__all__ = [
    "ConfigError", "ConfigIssue", "LoadedConfig", "NeoXConfig",
    "build_config", "load_config", "load_resolved", "save_resolved",
]
