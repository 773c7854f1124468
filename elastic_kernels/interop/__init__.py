"""Hugging Face interop (docs/interop.md): import NemotronH / Mamba2 parents, export nested budgets.

``from_hf(path, *, dtype=None, nested_choices=None, device="cpu") -> (ElasticHybridLM, ElasticHybridConfig)``
    a NemotronH or Mamba2 ``save_pretrained`` directory (one safetensors file or shards; a
    Model-Optimizer NVFP4 / FP8 export of ours is dequantized exactly). No transformers needed.
``to_hf(model, budget, out_dir, *, architecture=None, tokenizer_dir=None, quantization=None, extra=None)``
    the submodel at ``budget`` as a standalone directory that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads (config sizes are the slice's);
    ``quantization="nvfp4" | "fp8"`` writes Model-Optimizer's layout (:mod:`.modelopt`).
``export_nested(path, budget, out_dir, *, quantization=None, ...)``: the same for a budget of a
    nested checkpoint; a quantized checkpoint's codes and scales are kept (no requantization).
``load_parent(path, *, nested_choices=None)``: an HF directory or one of our nested checkpoints;
    ``parent_config(path, *, nested_choices=None)``: its config alone (no weights read).
``blocked_index(n, groups)``: the interleaved -> blocked (Hugging Face) unit permutation.
The ``elastic-export`` command is :mod:`.cli`.
"""
from .hf import export_nested, from_hf, load_parent, parent_config, read_hf_config, read_hf_tensors, to_hf
from .hf_config import config_from_hf, config_to_hf
from .hf_weights import blocked_index, state_from_hf, state_to_hf
from .modelopt import dequantize_hf_state, quantize_hf_state

__all__ = ["blocked_index", "config_from_hf", "config_to_hf", "dequantize_hf_state", "export_nested", "from_hf",
           "load_parent", "parent_config", "quantize_hf_state",
           "read_hf_config", "read_hf_tensors", "state_from_hf", "state_to_hf", "to_hf"]
