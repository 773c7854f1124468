r"""The elastic hybrid reference model (issue 5; DESIGN §1-§3).

A minimal Nemotron-H-like hybrid LM in which every Star Elastic axis is nested (a submodel keeps a
*prefix* of every axis). Public API (``from elastic_kernels.models import ...``):

Configuration and budgets (:mod:`.config`)
------------------------------------------
``ElasticHybridConfig(vocab_size=48, hidden_size=64, pattern="M-M*ME", mamba_heads=8,
mamba_head_dim=16, mamba_groups=2, mamba_state=16, mamba_conv_kernel=4, mamba_chunk_size=32,
moe_experts=8, moe_top_k=2, moe_ffn=64, moe_shared_ffn=0, moe_score="softmax",
moe_activation="relu2", attn_heads=4, attn_kv_heads=2, attn_head_dim=None, ffn_size=128,
ffn_activation="relu2", norm_eps=1e-5, tie_embeddings=False, init_std=0.02,
nested_choices={axis: (1.0, 0.75, 0.5)}, layer_sizes=None)``
    dataclass; ``pattern`` letters: ``M`` Mamba2, ``E`` MoE, ``*`` GQA attention, ``-`` dense FFN.
    ``.to_json()`` / ``ElasticHybridConfig.from_json(s)``, ``.to_dict()`` / ``.from_dict(d)``,
    ``.choice_sizes(axis, occurrence=0)`` (sizes of the nested choices), ``.layers_of(letter)``,
    ``.full_size(axis, occurrence=0)``, ``.num_units(axis)``. Bad fields raise ValueError/TypeError
    naming the field.
``AXES = ("hidden", "mamba_heads", "experts", "expert_ffn", "ffn")``
``Budget(hidden=None, mamba_heads=None, experts=None, expert_ffn=None, ffn=None)``
    frozen dataclass of *unit counts* (None = full). ``hidden`` is one int; the per-layer axes take
    an int (all layers of that kind) or a tuple with one int per layer of that kind in pattern
    order (``mamba_heads``: per ``M`` layer, total heads, a multiple of ``mamba_groups``;
    ``experts``/``expert_ffn``: per ``E`` layer; ``ffn``: per ``-`` layer).
    ``Budget.from_fractions(config, fraction=None, **per_axis_fraction)``, ``.resolve(config)``
    -> ``{axis: per-layer sizes tuple}``, ``.to_dict()`` / ``Budget.from_dict(d)``.

The model (:mod:`.model`)
-------------------------
``ElasticHybridLM(config)`` (nn.Module):
    ``forward(input_ids, budget=None, soft_masks=None, cache=None) -> logits``
        input_ids: (batch, seqlen) int64; logits: (batch, seqlen, vocab_size) float32.
        budget: None (full) | Budget | a sequence of ``batch`` Budgets (per-sample budgets: each
        sample equals running it alone at its budget). Hard widths skip work: weights are used as
        prefix views and the ops get int widths (or per-sample LongTensors).
        cache: a :class:`HybridCache` from ``model.new_cache(batch)``; when given, the call
        consumes ``input_ids`` as the continuation of the cached sequence (prefill of any length,
        or one-token decode steps via ``ssd_state_update``) and updates the cache in place. Use
        the same budget(s) for every call on one cache.
    ``new_cache(batch, device=None, dtype=None) -> HybridCache``: ``.layers`` (per layer a
        ``MambaLayerCache(conv_x, conv_bc, ssm, has_state)``, an ``AttentionLayerCache(k, v)`` or
        None), ``.batch``, ``.seqlen`` (tokens consumed). Buffers are full-size; a budget updates
        the prefixes it uses.
    ``param_count(budget=None, active=False) -> int``: parameters of the submodel (== numel of
        ``slice(budget)``); ``active=True`` counts only ``moe_top_k`` routed experts per MoE layer.
    ``expected_param_count(sizes, active=False) -> Tensor``: the same count as a differentiable
        function of (possibly fractional, tensor-valued) sizes ``{axis: number | Tensor | per-layer
        sequence}`` (for router losses); equal to ``param_count`` at integer sizes.
    ``slice(budget) -> ElasticHybridLM``: a standalone model with really smaller tensors whose
        forward equals the masked forward at ``budget``.
    ``nvfp4_weights() -> {name: NVFP4Tensor}`` (empty unless loaded with ``weights="nvfp4"``).
    ``resolve_budget(budget) -> {axis: per-layer sizes}``; ``sliced_config(budget)``;
    ``sliced_shapes(sizes, active=False) -> {state-dict name: prefix shape}`` (every parameter
    of a submodel is a prefix of the parent's in every dimension).
    Logits are float32 (float64 for a float64 model); bf16/fp16 models compute norms and SSM
    states in float32. On a small shared CPU, ``torch.set_num_threads(1)`` is much faster for
    the tiny presets (measured: test suite 241 s -> 20 s under load).

Soft masks (router training; DESIGN §3.2)
-----------------------------------------
``soft_masks`` is a dict ``{axis: value}`` with keys from ``AXES`` (any subset). ``value`` is a
float tensor over that axis's units *in nesting order* (unit ``i`` belongs to every submodel
keeping more than ``i`` units), shape ``(units,)`` (shared by the batch) or ``(batch, units)``,
where ``units`` is the layer's full size (``hidden_size``, the layer's Mamba heads, experts,
expert FFN width, dense FFN width). For per-layer axes the value may also be a sequence with one
entry (tensor or None) per layer of that kind, in pattern order; a single tensor is shared by all
those layers. Masks are multiplied in and are differentiable; they combine with ``budget`` (hard
widths cut first; mask entries beyond a hard width are ignored). Masks should be >= 0, and a
hidden mask must not be all zero. Exact semantics:

- ``"hidden"``: multiplies the embedding output and every layer's output (the residual stream);
  every RMSNorm uses it as channel weights of its mean square: ``sum(m x^2) / sum(m)``.
- ``"mamba_heads"``: ``ssd_scan(head_scale=...)`` (each head's output), and head weights of the
  per-group gated RMSNorm statistics.
- ``"experts"``: ``log(m)`` is added to the router logits (m = 0 removes an expert; for the
  softmax router this is the m-weighted softmax). With a sigmoid router and a correction bias a
  zeroed expert contributes 0 but may still take a top-k slot.
- ``"expert_ffn"``: ``moe_experts(channel_scale=...)`` (each routed expert's intermediate channel).
- ``"ffn"``: multiplies the dense FFN's intermediate activation.

A 0/1 prefix mask gives exactly the hard-width result (tested).

Layers (:mod:`.layers`; public, reusable nn.Modules)
----------------------------------------------------
Every layer takes its input with the active hidden prefix as the last dim (``x: (..., k)``,
``k <= hidden``) and uses prefix views of its weights. Per-sample widths are LongTensors
``(batch,)``; soft masks are over the layer's full units, ``(units,)`` or ``(batch, units)``.

- ``ElasticRMSNorm(dim, eps)``: ``forward(x, width=None, mask=None)``; normalizes over the active
  prefix only.
- ``ElasticGatedRMSNorm(nheads, head_dim, ngroups, eps)``: ``forward(y, z, head_weights=None)``;
  ``y * silu(z)`` normalized per group (interleaved heads), right for any active head prefix.
- ``ElasticMamba2Mixer(hidden, nheads, head_dim, ngroups, d_state, conv_kernel, chunk_size, eps)``:
  ``forward(x, active_heads=None, head_mask=None, cache=None, max_active=None)``.
- ``ElasticMoE(hidden, num_experts, top_k, ffn, shared_ffn, score, activation)``:
  ``forward(x, num_experts=None, ffn_width=None, expert_mask=None, channel_mask=None)``.
- ``ElasticFFN(hidden, ffn, activation)``: ``forward(x, width=None, mask=None, max_width=None)``.
- ``GQAAttention(hidden, nheads, nkv_heads, head_dim)``: ``forward(x, cache=None)`` (causal SDPA).
- ``ElasticEmbedding(vocab, hidden)``, ``ElasticLMHead(vocab, hidden)``.

Importance and permutation (:mod:`.importance`)
-----------------------------------------------
``estimate_importance(model, batches) -> dict``: forward passes only (no gradients) over an
iterable of input_ids tensors; returns ``{"hidden": (hidden,), "mamba_heads": [(H,) per M layer],
"experts": [(E,) per E layer], "expert_ffn": [(E, F) per E layer], "ffn": [(F,) per - layer]}``
(float64, at full width; the model's forward hooks, no gradients).
``permute_by_importance(model, scores) -> dict`` reorders weights in place (most important first;
Mamba heads within their group) and returns the permutations; full-width outputs do not change.

Nested checkpoints (:mod:`.checkpoint`)
---------------------------------------
``save_nested(model, path, budgets, *, quantization=None)``: ``path`` is a directory; writes
``model.safetensors`` and ``config.json`` (config + budget table ``{name: Budget}``), each
atomically (temp file + rename). ``quantization="nvfp4" | "fp8"`` stores the linear weights of
``quantizable_weights(model)`` quantized (Model-Optimizer-style ``name``, ``name_scale``,
``name_scale_2``); every nested slice is a prefix of the one quantized tensor (no requantization;
NVFP4 input features slice at multiples of 16).
``load_nested(path, budget=None, *, device="cpu", stats=None, weights="dequantize") ->
ElasticHybridLM``: ``budget`` a table name, a Budget or None (full); reads only the header and the
prefix bytes of every slice (``stats`` receives ``bytes_read``/``header_bytes``/``file_bytes``).
``weights="dequantize"`` decodes NVFP4/FP8 weights into the saved dtype (a regular model);
``weights="nvfp4"`` keeps NVFP4 weights packed and the layers run W4A16 (``nvfp4_linear``, NVFP4
``moe_experts``) on nested slices of them, for serving (``model.nvfp4_weights()`` lists them;
slice/save/importance then raise TypeError). ``load_nested_state(path, budget=None)`` -> ``(config,
{name: Tensor | NVFP4Tensor | (fp8 codes, scale)})`` for serving with ``nvfp4_linear``.
``read_nested_config(path) -> (config, budgets)``.
Errors: ``CheckpointError`` (a ValueError) for corrupt or mismatched files.
"""
from .checkpoint import (CheckpointError, load_nested, load_nested_state, quantizable_weights, read_nested_config,
                         save_nested)
from .config import AXES, Budget, ElasticHybridConfig
from .importance import estimate_importance, permute_by_importance
from .cache import AttentionLayerCache, HybridCache, LayerCache, MambaLayerCache
from .layers import (ElasticEmbedding, ElasticFFN, ElasticGatedRMSNorm, ElasticLMHead, ElasticMamba2Mixer, ElasticMoE,
                     ElasticRMSNorm, GQAAttention)
from .model import ElasticHybridLM, HybridBlock

__all__ = ["AXES", "AttentionLayerCache", "Budget", "CheckpointError", "ElasticEmbedding", "ElasticFFN",
           "ElasticGatedRMSNorm", "ElasticHybridConfig", "ElasticHybridLM", "ElasticLMHead", "ElasticMamba2Mixer",
           "ElasticMoE", "ElasticRMSNorm", "GQAAttention", "HybridBlock", "HybridCache", "LayerCache", "MambaLayerCache",
           "estimate_importance", "load_nested", "load_nested_state", "permute_by_importance", "quantizable_weights",
           "read_nested_config", "save_nested"]
