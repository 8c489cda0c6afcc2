"""Hugging Face ``architectures`` name -> jaxllm model class."""

from __future__ import annotations

from model_zoo.config import (GEMMA_ARCHITECTURES, SUPPORTED_ARCHITECTURES, ModelConfig,
                              UnsupportedArchitectureError)
from model_zoo.gemma import GemmaForCausalLM
from model_zoo.llama import LlamaForCausalLM

_REGISTRY = {name: GemmaForCausalLM if name in GEMMA_ARCHITECTURES else LlamaForCausalLM
             for name in SUPPORTED_ARCHITECTURES}


def get_model_class(architecture: str):
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Model architecture {architecture!r} is not supported by jaxllm. "
            f"Supported architectures: {', '.join(sorted(_REGISTRY))}.") from None


def build_model(config: ModelConfig, params, **kwargs):
    return get_model_class(config.architecture)(config, params, **kwargs)
