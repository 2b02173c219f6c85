"""Nested (Student inside TA) GPT-2, GAU and Hugging Face models, their plain counterparts and configs."""
from .base import STREAMS, NestedLM, StreamShape, pick_output
from .config import GAU_PRESETS, GPT2_PRESETS, GAUConfig, GPT2Config, NestingConfig
from .gau import GAU, GAULayerShape, NestedGAU
from .gpt2 import GPT2, BlockShape, NestedGPT2, load_hf_gpt2
from .hf_causal import HF_FAMILIES, HFCausalLM, HFFamily, HFModelConfig, NestedHFCausalLM, load_hf_causal, nest_hf

__all__ = [
    "GPT2Config",
    "GAUConfig",
    "NestingConfig",
    "GPT2_PRESETS",
    "GAU_PRESETS",
    "GPT2",
    "BlockShape",
    "NestedGPT2",
    "GAU",
    "GAULayerShape",
    "NestedGAU",
    "NestedLM",
    "STREAMS",
    "StreamShape",
    "load_hf_gpt2",
    "pick_output",
    "HF_FAMILIES",
    "HFFamily",
    "HFModelConfig",
    "NestedHFCausalLM",
    "HFCausalLM",
    "nest_hf",
    "load_hf_causal",
]
