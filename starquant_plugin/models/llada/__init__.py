from starquant_plugin.models.llada.configuration_llada import LLaDAConfig
from starquant_plugin.models.llada.modeling_llada import LLaDALlamaBlock, LLaDAModelLM

__all__ = ["LLaDAConfig", "LLaDALlamaBlock", "LLaDAModelLM"]
