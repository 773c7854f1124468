"""Serving mixed budgets: one ragged batch against one batch per budget and against padding (CPU).

The same requests (a realistic mix of think/answer budgets, prompt lengths, thinking caps and
answer lengths; all arriving at time 0) are served three ways by
:class:`elastic_kernels.infer.Scheduler`, and must give the same tokens (checked):

- ``mixed``: one running batch of every request: prompts of all lengths in one packed prefill,
  every decode step one forward with per-row budgets and phases, switches re-prefill only their
  rows;
- ``per_budget``: one batch per (think, answer) budget pair, run in turn (a serving system with
  one budget per batch); a request's latency includes the batches before its own;
- ``padded``: one batch like ``mixed`` but every prefill computes padding up to its longest
  sequence (``pad_prefill``: the cost of padding to equal lengths; outputs unchanged).

Figures: generated tokens per second of CPU time (``time.thread_time``, one intra-op thread: other
load on a shared machine disturbs it far less than wall time) and per-request latency (time from
the start until the request's last token; median and p90), the median over ``--reps`` interleaved
runs (mixed, per_budget, padded, mixed, ...). Absolute times on a shared machine are noise; read
the ratios.

Usage: ``python bench/bench_serve.py [--concurrency 4,16,64] [--reps 3] [--seed 0] [--json PATH]``
(default ``bench/results/serve_cpu.json``); prints the table.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from elastic_kernels.infer import Scheduler
from elastic_kernels.models import Budget, ElasticHybridConfig, ElasticHybridLM

MODES = ("mixed", "per_budget", "padded")
#: (think budget, answer budget) pairs and their shares of the traffic
MIX = ((("quarter", "full"), 0.3), (("quarter", "quarter"), 0.2), (("half", "full"), 0.2),
       (("half", "half"), 0.15), (("full", "full"), 0.15))
END_THINK, EOS = 254, 255


def make_model(seed: int = 0) -> tuple[ElasticHybridLM, dict[str, Budget]]:
    """A random-weight hybrid (all four layer kinds) with budgets at 1/4, 1/2 and full width."""
    torch.manual_seed(seed)
    cfg = ElasticHybridConfig(vocab_size=256, hidden_size=256, pattern="M-M*ME", mamba_heads=8, mamba_head_dim=32,
                              mamba_groups=2, mamba_state=16, mamba_chunk_size=32, moe_experts=8, moe_top_k=2,
                              moe_ffn=256, ffn_size=512, attn_heads=4, attn_kv_heads=2,
                              nested_choices={a: (1.0, 0.5, 0.25) for a in ("hidden", "mamba_heads", "experts",
                                                                            "expert_ffn", "ffn")})
    model = ElasticHybridLM(cfg).eval()
    return model, {"full": Budget(), "half": Budget.from_fractions(cfg, 0.5),
                   "quarter": Budget.from_fractions(cfg, 0.25)}


def make_requests(n: int, seed: int) -> list[dict]:
    """``n`` requests: budgets drawn from :data:`MIX`, prompts of 8-96 tokens, 4-32 thinking
    tokens (the cap forces the switch), 2-12 answer tokens."""
    rng = random.Random(seed)
    pairs, weights = zip(*MIX)
    out = []
    for _ in range(n):
        think, answer = rng.choices(pairs, weights)[0]
        out.append(dict(prompt=[rng.randrange(END_THINK) for _ in range(rng.randint(8, 96))], think_budget=think,
                        answer_budget=answer, max_think_tokens=rng.randint(4, 32),
                        max_answer_tokens=rng.randint(2, 12)))
    return out


def serve(model, budgets, requests: list[dict], mode: str) -> dict:
    """Serve ``requests`` in ``mode``; returns thread-CPU seconds, per-request latencies and tokens."""
    if mode == "per_budget":
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r["think_budget"], r["answer_budget"]), []).append(i)
        batches = list(groups.values())
    else:
        batches = [list(range(len(requests)))]
    latency, tokens = [0.0] * len(requests), [None] * len(requests)
    t0 = time.thread_time()
    for batch in batches:
        sched = Scheduler(model, budgets=budgets, end_think_id=END_THINK, eos_id=EOS, max_batch=len(batch),
                          max_length=512, pad_prefill=mode == "padded")
        handles = {sched.submit(**requests[i]).id: i for i in batch}
        while not sched.idle:
            for e in sched.step():
                if e.finished:
                    i = handles[e.request.id]
                    latency[i], tokens[i] = time.thread_time() - t0, e.request.tokens
    total = time.thread_time() - t0
    return {"seconds": total, "latency": latency, "tokens": tokens}


def percentile(xs, q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run(concurrency: list[int], reps: int, seed: int) -> list[dict]:
    model, budgets = make_model(seed)
    rows = []
    torch.set_num_threads(1)
    for n in concurrency:
        requests = make_requests(n, seed + n)
        serve(model, budgets, requests[:2], "mixed")  # warm-up
        runs = {m: [] for m in MODES}
        for _ in range(reps):
            for m in MODES:
                runs[m].append(serve(model, budgets, requests, m))
        ref = runs["mixed"][0]["tokens"]
        for m in MODES:
            if any(r["tokens"] != ref for r in runs[m]):
                raise AssertionError(f"bench_serve: {m} gave other tokens than mixed at {n} requests")
        generated = sum(len(t) for t in ref)
        for m in MODES:
            secs = statistics.median(r["seconds"] for r in runs[m])
            lat = [statistics.median(r["latency"][i] for r in runs[m]) for i in range(n)]
            rows.append({"requests": n, "mode": m, "generated_tokens": generated,
                         "prompt_tokens": sum(len(r["prompt"]) for r in requests),
                         "seconds": secs, "tokens_per_s": generated / secs,
                         "latency_median_s": statistics.median(lat), "latency_p90_s": percentile(lat, 0.9),
                         "runs_seconds": [r["seconds"] for r in runs[m]]})
        mixed = next(r for r in rows if r["requests"] == n and r["mode"] == "mixed")
        for r in rows:
            if r["requests"] == n:
                r["throughput_vs_mixed"] = r["tokens_per_s"] / mixed["tokens_per_s"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'requests':>8} {'mode':>10} {'tokens':>6} {'tok/s':>8} {'x mixed':>7} {'lat med s':>9} "
             f"{'lat p90 s':>9}"]
    for r in rows:
        lines.append(f"{r['requests']:>8} {r['mode']:>10} {r['generated_tokens']:>6} {r['tokens_per_s']:>8.1f} "
                     f"{r['throughput_vs_mixed']:>7.2f} {r['latency_median_s']:>9.3f} {r['latency_p90_s']:>9.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", default="4,16,64", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--reps", type=int, default=3, help="interleaved runs per mode (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "serve_cpu.json"))
    args = ap.parse_args(argv)
    try:
        conc = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency must be comma-separated ints, got {args.concurrency!r}")
    if not conc or min(conc) < 1 or args.reps < 1:
        ap.error("--concurrency entries and --reps must be >= 1")
    rows = run(conc, args.reps, args.seed)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": " ".join(["python", "bench/bench_serve.py"] + sys.argv[1:]),
                                "torch": torch.__version__, "machine": platform.machine(),
                                "mix": [[list(p), w] for p, w in MIX], "results": rows}, indent=1))
    print(table(rows))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
