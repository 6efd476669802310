from starquant_plugin.models.dream.configuration_dream import DreamConfig
from starquant_plugin.models.dream.modeling_dream import DreamDecoderLayer, DreamModel

__all__ = ["DreamConfig", "DreamDecoderLayer", "DreamModel"]
