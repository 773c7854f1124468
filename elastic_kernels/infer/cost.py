"""Cost models of one generated request at its (think, answer) budgets, per problem:

- ``flops``: every computed token costs ``2 x`` the matmul
  parameters it uses at its phase's budget (MoE: ``moe_top_k`` experts; the embedding is a lookup),
  plus attention scores/values ``4 x heads x head_dim`` per attended position per attention layer,
  plus the SSM recurrence ``6 x heads x head_dim x d_state`` per Mamba layer.
- ``bytes``: the memory traffic at batch 1 (decode is memory bound, so this is the
  latency proxy of one request): each one-token forward reads the active weights of its budget
  plus the attention keys/values it attends to and the Mamba states (read and written, float32);
  each prefill forward reads the budget's weights once (every expert of the budget).

A re-prefill at the switch is charged to the answer phase.
"""
from __future__ import annotations

from typing import Mapping

from ..models.config import Budget
from .generate import Generation

__all__ = ["CostModel"]


class CostModel:
    """Per-token FLOPs and bytes of each budget of one model (see the module docstring)."""

    def __init__(self, model, budgets: Mapping[str, Budget]) -> None:
        c = model.config
        self.bytes_per_param = next(model.parameters()).element_size()
        self.attn_layers = len(c.layers_of("*"))
        self.attn_flops_per_position = 4 * c.attn_heads * c.head_dim * self.attn_layers
        self.kv_bytes_per_position = 2 * c.attn_kv_heads * c.head_dim * self.attn_layers * self.bytes_per_param
        self.per_budget: dict[str, dict[str, float]] = {}
        for name, b in budgets.items():
            sizes = model.resolve_budget(b)
            embed = c.vocab_size * sizes["hidden"][0]
            active, total = model.param_count(b, active=True), model.param_count(b)
            lookup = 0 if c.tie_embeddings else embed  # the lookup is no matmul (tied: it is the LM head)
            heads = sizes["mamba_heads"]
            ssm_state = sum(heads) * c.mamba_head_dim * c.mamba_state
            self.per_budget[name] = {
                "params_active": active, "params_total": total,
                "flops_per_token": 2.0 * (active - lookup) + 6.0 * ssm_state,
                # one-token forward: active weights (one embedding row) + Mamba states read and written
                "decode_bytes": float((active - lookup) * self.bytes_per_param + 2 * ssm_state * 4),
                # prefill: every weight of the budget once, the final Mamba state written
                "prefill_bytes": float((total - lookup) * self.bytes_per_param + ssm_state * 4),
            }

    def request_cost(self, g: Generation) -> dict[str, float]:
        """``{"flops", "bytes"}`` of one generated request."""
        flops = nbytes = 0.0
        for phase, name in (("think", g.think_budget), ("answer", g.answer_budget)):
            w, pb = g.work[phase], self.per_budget[name]
            tokens = w["prefill_tokens"] + w["decode_tokens"]
            flops += pb["flops_per_token"] * tokens
            flops += self.attn_flops_per_position * (w["prefill_context"] + w["decode_context"])
            nbytes += pb["decode_bytes"] * w["decode_tokens"] + pb["prefill_bytes"] * w["prefill_forwards"]
            nbytes += self.kv_bytes_per_position * w["decode_context"]
        return {"flops": flops, "bytes": nbytes}
