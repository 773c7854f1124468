"""The elastic hybrid reference model: configs and budgets, the public elastic layers (one class
per layer kind, :mod:`.protocol`), the hybrid LM with decode caches, importance and permutation,
and nested (optionally NVFP4/FP8) checkpoints.

The design (elastic axes, the width contract, soft masks, checkpoint format) is in docs/design.md;
each class and function documents its own arguments and shapes.
"""
from .checkpoint import (CheckpointError, load_nested, load_nested_state, quantizable_weights, read_nested_config,
                         save_nested)
from .config import AXES, Budget, ElasticHybridConfig
from .importance import estimate_importance, permute_by_importance
from .cache import AttentionLayerCache, HybridCache, LayerCache, MambaLayerCache
from .layers import (LAYER_KINDS, ElasticEmbedding, ElasticFFN, ElasticGatedRMSNorm, ElasticLMHead, ElasticMamba2Mixer, ElasticMoE,
                     ElasticRMSNorm, GQAAttention)
from .model import ElasticHybridLM, HybridBlock
from .protocol import ElasticLayer, LayerAxis

__all__ = ["AXES", "AttentionLayerCache", "Budget", "CheckpointError", "ElasticEmbedding", "ElasticFFN",
           "ElasticGatedRMSNorm", "ElasticHybridConfig", "ElasticHybridLM", "ElasticLayer", "ElasticLMHead", "ElasticMamba2Mixer",
           "ElasticMoE", "ElasticRMSNorm", "GQAAttention", "HybridBlock", "HybridCache", "LAYER_KINDS", "LayerAxis", "LayerCache",
           "MambaLayerCache",
           "estimate_importance", "load_nested", "load_nested_state", "permute_by_importance", "quantizable_weights",
           "read_nested_config", "save_nested"]
