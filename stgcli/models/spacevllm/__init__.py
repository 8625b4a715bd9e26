"""SpaceVLLM on transformers' LlavaOnevision (SigLIP + projector + Qwen2).

configuration_spacevllm: the config (a LlavaOnevisionConfig plus query/decoder fields)
modeling_spacevllm:      the model (LlavaOnevisionForConditionalGeneration plus space decoder)
processing_spacevllm:    frames + sentence -> model inputs; answer text -> span; boxes -> pixels
"""
from .configuration_spacevllm import SpaceVLLMConfig
from .modeling_spacevllm import SpaceVLLMForConditionalGeneration, SpaceVLLMOutput
from .processing_spacevllm import SpaceVLLMProcessor

__all__ = ["SpaceVLLMConfig", "SpaceVLLMForConditionalGeneration", "SpaceVLLMOutput", "SpaceVLLMProcessor"]
