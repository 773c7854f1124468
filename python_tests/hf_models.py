"""Tiny random Hugging Face NemotronH / Mamba2 parents for the interop tests (docs/interop.md).

``CONFIGS`` covers every layer kind, routed scaling != 1, group-limited routing, non-default dt
limits, ``norm_topk_prob`` both ways and tied / untied embeddings. ``save_random(name, dir)``
writes a ``save_pretrained`` directory with non-trivial values of the parameters transformers
initialises to constants (dt_bias, D, norms, correction bias). ``lifted_fp32_casts()`` makes
transformers' torch paths compute in float64 for a float64 model (they cast to float32 inside),
so a float64 run is the ground truth of docs/design.md §5.
"""
from __future__ import annotations

import contextlib

import torch

NEMOTRON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
                chunk_size=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                moe_shared_expert_intermediate_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
L = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}

CONFIGS = {
    "nh_groups": ("nemotron_h", dict(NEMOTRON, layers_block_type=[L[c] for c in "ME*-ME"], n_group=2, topk_group=1,
                                     routed_scaling_factor=2.5, time_step_min=0.05, norm_topk_prob=True)),
    "nh_nonorm_tied": ("nemotron_h", dict(NEMOTRON, layers_block_type=[L[c] for c in "M*EM-E"], n_group=4,
                                          topk_group=2, routed_scaling_factor=1.7, norm_topk_prob=False,
                                          time_step_min=0.02, tie_word_embeddings=True)),
    "nh_plain": ("nemotron_h", dict(NEMOTRON, layers_block_type=[L[c] for c in "MEM*E-"], mamba_num_heads=12,
                                    n_groups=3, norm_topk_prob=True, mlp_hidden_act="relu2")),
    "nh_wide_groups": ("nemotron_h", dict(NEMOTRON, layers_block_type=[L[c] for c in "E-MM*E"], n_routed_experts=12,
                                          num_experts_per_tok=3, n_group=3, topk_group=2, routed_scaling_factor=0.6,
                                          norm_topk_prob=False, time_step_min=0.1, chunk_size=8)),
    "mamba2": ("mamba2", dict(vocab_size=96, hidden_size=32, num_heads=8, head_dim=8, expand=2, n_groups=2,
                              state_size=16, num_hidden_layers=3, chunk_size=16, time_step_limit=(0.02, 0.3),
                              tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}


def hf_config(name: str):
    import transformers
    arch, kw = CONFIGS[name]
    cls = transformers.NemotronHConfig if arch == "nemotron_h" else transformers.Mamba2Config
    return cls(**kw)


@torch.no_grad()
def save_random(name: str, path, seed: int = 0, max_shard_size: str | None = None):
    """A random ``save_pretrained`` directory of config ``name``; returns the model (float32)."""
    import transformers
    torch.manual_seed(seed)
    cfg = hf_config(name)
    cls = transformers.NemotronHForCausalLM if CONFIGS[name][0] == "nemotron_h" else transformers.Mamba2ForCausalLM
    model = cls(cfg).eval()
    for mod in model.modules():
        if hasattr(mod, "e_score_correction_bias"):
            mod.e_score_correction_bias.normal_(0, 0.05)
        if hasattr(mod, "dt_bias"):
            mod.dt_bias.normal_(-2.5, 1.5)  # some dt below time_step_min, some above the Mamba2 limit
            mod.D.normal_(1, 0.3)
            mod.A_log.normal_(0.5, 0.5)
        if type(mod).__name__.endswith("RMSNormGated") or type(mod).__name__.endswith("RMSNorm"):
            mod.weight.normal_(1, 0.2)
        if hasattr(mod, "conv1d") and mod.conv1d.bias is not None:
            mod.conv1d.bias.normal_(0, 0.1)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return model


def load_hf(path, dtype=torch.float32):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager")
    return (model.double() if dtype == torch.float64 else model).eval()  # float64: the router too


@contextlib.contextmanager
def lifted_fp32_casts():
    """Within the block, casts of float64 tensors to float32 (``.float()``, ``.to(float32)``,
    ``.type(float32)``) keep float64."""
    T = torch.Tensor
    orig_float, orig_to, orig_type = T.float, T.to, T.type

    def float_(self, *a, **k):
        return self if self.dtype == torch.float64 else orig_float(self, *a, **k)

    def to_(self, *a, **k):
        if self.dtype == torch.float64:
            a = tuple(torch.float64 if x is torch.float32 else x for x in a)
            if k.get("dtype") is torch.float32:
                k["dtype"] = torch.float64
        return orig_to(self, *a, **k)

    def type_(self, *a, **k):
        if self.dtype == torch.float64 and a and a[0] is torch.float32:
            return self
        return orig_type(self, *a, **k)

    T.float, T.to, T.type = float_, to_, type_
    try:
        yield
    finally:
        T.float, T.to, T.type = orig_float, orig_to, orig_type


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor, steps: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``[full-sequence logits (batch, seqlen, vocab)] + [logits (batch, vocab) of each cached
    decode step of steps (batch, n)]`` of a transformers model (float64 of the logits)."""
    out = model(ids, use_cache=steps is not None)
    res = [out.logits.double()]
    if steps is not None:
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        for j in range(steps.shape[1]):
            out = model(steps[:, j:j + 1], cache=cache, use_cache=True)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            res.append(out.logits[:, -1].double())
    return res


@torch.no_grad()
def our_logits(model, ids: torch.Tensor, steps: torch.Tensor | None = None, budget=None) -> list[torch.Tensor]:
    """Like :func:`hf_logits` for an ``ElasticHybridLM``."""
    if steps is None:
        return [model(ids, budget=budget).double()]
    cache = model.new_cache(ids.shape[0])
    res = [model(ids, budget=budget, cache=cache).double()]
    for j in range(steps.shape[1]):
        res.append(model(steps[:, j:j + 1], budget=budget, cache=cache)[:, -1].double())
    return res


@torch.no_grad()
def our_greedy(model, ids: torch.Tensor, n: int, budget=None) -> torch.Tensor:
    """``(batch, n)`` greedy continuation of ``ids`` by an ``ElasticHybridLM`` (cached decode)."""
    cache = model.new_cache(ids.shape[0])
    logits = model(ids, budget=budget, cache=cache)[:, -1]
    out = []
    for _ in range(n):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        logits = model(tok, budget=budget, cache=cache)[:, -1]
    return torch.cat(out, 1)
