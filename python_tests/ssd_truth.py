"""A plain sequential Mamba2 SSD recurrence (the test's ground truth, not the chunked algorithm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_inputs(batch=2, seqlen=17, nheads=4, headdim=8, ngroups=2, dstate=8, *, dtype=torch.float32,
                device="cpu", D="head", z=True, dt_bias=True, initial_states=False, seq_idx=False,
                head_scale=False, dt_mean=-1.0):
    """Random SSD inputs as a kwargs dict for ``ssd_scan`` (A negative, dt around ``dt_mean``)."""
    g = torch.Generator().manual_seed(1234 + seqlen * 7 + nheads)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    inp = dict(
        x=r(batch, seqlen, nheads, headdim), dt=r(batch, seqlen, nheads) * 0.5 + dt_mean,
        A=-torch.rand(nheads, generator=g) * 2 - 0.1,
        B=r(batch, seqlen, ngroups, dstate) * 0.5, C=r(batch, seqlen, ngroups, dstate) * 0.5)
    if D == "head":
        inp["D"] = r(nheads)
    elif D == "channel":
        inp["D"] = r(nheads, headdim)
    if z:
        inp["z"] = r(batch, seqlen, nheads, headdim)
    if dt_bias:
        inp["dt_bias"] = r(nheads) * 0.3
    if initial_states:
        inp["initial_states"] = r(batch, nheads, headdim, dstate) * 0.5
    if seq_idx:
        cuts = torch.sort(torch.randint(0, max(seqlen, 1), (batch, 2), generator=g), dim=1).values
        pos = torch.arange(seqlen)
        inp["seq_idx"] = ((pos[None] >= cuts[:, :1]).int() + (pos[None] >= cuts[:, 1:]).int()).to(torch.int32)
    if head_scale:
        inp["head_scale"] = torch.rand(batch, nheads, generator=g) + 0.5
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in inp.items()}


def sequential_ssd(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False,
                   dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None,
                   head_layout="blocked", active_heads=None, head_scale=None,
                   compute_dtype=torch.float64, **unused):
    """Step-by-step recurrence h_t = exp(dt A) h_{t-1} + dt B x; y = C h + D x; y *= silu(z).

    Returns (y in x.dtype, final states in compute_dtype). Widths are applied by masking.
    """
    cd = compute_dtype
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    hpg = h // g
    heads = torch.arange(h)
    group = heads % g if head_layout == "interleaved" else heads // hpg
    rank = heads // g if head_layout == "interleaved" else heads % hpg
    dt = dt.to(cd) + (dt_bias.to(cd) if dt_bias is not None else 0)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    xs, Bs, Cs, As = x.to(cd), B.to(cd)[:, :, group], C.to(cd)[:, :, group], A.to(cd)
    state = initial_states.to(cd).clone() if initial_states is not None else torch.zeros(b, h, p, n, dtype=cd)
    prev_seq = torch.zeros(b, dtype=torch.int64)
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * As)  # (b, h)
        if seq_idx is not None:
            same = (seq_idx[:, t].long() == prev_seq).to(cd)
            decay = decay * same[:, None]
            prev_seq = seq_idx[:, t].long()
        state = state * decay[..., None, None] + (dt[:, t, :, None] * xs[:, t])[..., None] * Bs[:, t, :, None, :]
        yt = torch.einsum("bhpn,bhn->bhp", state, Cs[:, t])
        if D is not None:
            yt = yt + (D.to(cd)[:, None] if D.dim() == 1 else D.to(cd)) * xs[:, t]
        if z is not None:
            yt = yt * F.silu(z[:, t].to(cd))
        ys.append(yt)
    y = torch.stack(ys, 1) if l else xs.new_zeros(b, 0, h, p)
    if head_scale is not None:
        y = y * head_scale.to(cd)[:, None, :, None]
    if active_heads is not None:
        k = active_heads if isinstance(active_heads, torch.Tensor) else torch.full((b,), active_heads)
        mask = (rank[None, :] < (k.long()[:, None] // g)).to(cd)
        y = y * mask[:, None, :, None]
        state = state * mask[:, :, None, None]
    return y.to(x.dtype), state
