"""matta: Matryoshka Teaching-Assistant training with fused kernels.

A Student model nested inside a Teaching Assistant that shares its weights, both trained at
once with online distillation (paper: "Matryoshka Model Learning for Improved Elastic
Student Models", KDD 2025).
"""
from ._source_tree import ensure_kernels_subpackage

ensure_kernels_subpackage()

from .extraction import extract, layer_choices, num_parameters_of, wide_narrow_wide_family  # noqa: E402
from .hf import export_hf_gpt2, load_extracted, save_extracted  # noqa: E402
from .layers import NestedLinear  # noqa: E402
from .losses import MatTALoss, MatTALossOutput, fused_linear_matta_loss, ramp_value  # noqa: E402
from .models import GAU, GPT2, GAUConfig, GPT2Config, NestedGAU, NestedGPT2, NestingConfig  # noqa: E402
from .models import HFCausalLM, NestedHFCausalLM, nest_hf  # noqa: E402
from .nestify import nestify  # noqa: E402
from . import optim  # noqa: E402
from .optim import Shampoo  # noqa: E402
from .ops import nested_linear, nested_linear_reference  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "NestedLinear", "nested_linear", "nested_linear_reference",
    "MatTALoss", "MatTALossOutput", "fused_linear_matta_loss", "ramp_value", "Shampoo", "optim",
    "GPT2Config", "GAUConfig", "NestingConfig", "NestedGPT2", "NestedGAU", "GPT2", "GAU", "nestify",
    "nest_hf", "NestedHFCausalLM", "HFCausalLM",
    "extract", "layer_choices", "num_parameters_of", "wide_narrow_wide_family",
    "export_hf_gpt2", "save_extracted", "load_extracted",
]
