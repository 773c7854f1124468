"""Run configuration: one dataclass (each field documented where it is declared, which is what
``elastic-train --help`` shows), three presets, and range checks of every field.

This module imports neither torch nor the CLI library, so a command line is parsed and checked
before anything slow is imported (:mod:`.cli`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

__all__ = ["TrainConfig", "PRESETS", "ConfigError", "make_config", "preset_config", "RESUME_FREE", "ELASTIC_AXES"]

# the elastic axes (elastic_kernels.models.AXES, spelled out: this module imports no torch)
ELASTIC_AXES = ("hidden", "mamba_heads", "experts", "expert_ffn", "ffn")
# config fields that may differ between a run and its resumption
RESUME_FREE = frozenset({"resume", "stop_after", "progress", "threads", "device", "run_dir", "parallel", "procs",
                         "concurrent_stages"})


class ConfigError(ValueError):
    """A config field out of range; ``field`` names it (the CLI option is ``--field-name``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.detail = message


def _list(*values):
    return field(default_factory=lambda: list(values))


@dataclass
class TrainConfig:
    """The Star Elastic reference loop: stage 0 parent, stage 1 importance + permutation, stage 2
    routers + curriculum distillation of all nested budgets, stage 3 (--qad)
    quantization-aware distillation, independent baselines, and a report (report.md /
    report.json / report.png) in the run directory."""

    # run
    preset: Literal["smoke", "tiny", "small"] = "tiny"
    """preset the other defaults come from: smoke (seconds), tiny (CPU minutes), small (GPU)"""
    run_dir: str = ""
    """output directory ('' = runs/<preset>): config, metrics.jsonl, checkpoints, report"""
    seed: int = 0
    """seed of the model init, data splits, batches, budget sampling and Gumbel noise"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device (under torchrun, cuda:<local rank>)"""
    threads: int = 1
    """torch CPU threads per process (0 = torch default); the tiny model runs fastest on one"""
    procs: int = 1
    """data-parallel worker processes elastic-train starts itself on this machine (gloo on CPU, one --threads
    each; on CUDA at most one per GPU); ignored under torchrun, which starts the processes itself"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """scale-out over processes (--procs or torchrun): ddp (replicated model, averaged gradients) | fsdp (FSDP2:
    parameters, gradients and optimizer state sharded across ranks; checkpoints stay full and resumable by either)"""
    concurrent_stages: bool = True
    """with several DDP processes, run the independent baseline stages at the same time, one per process at full
    batch (the single-process computation, no gradient exchange) instead of each data-parallel over all"""
    resume: bool = False
    """continue the interrupted run in --run-dir from its last checkpoint, with its saved configuration"""
    stop_after: int = 0
    """stop (with a resumable checkpoint) after this many optimizer steps in this invocation (0 = run to the end)"""
    seeds: int = 1
    """repeat the whole run with this many seeds (--seed upward) in <run_dir>/seed-<s> and write the spread of
    every claim (seeds.md / seeds.json)"""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """a step with a non-finite loss or gradient: stop the run (its last checkpoint kept) or skip the step"""
    # task
    task: str = "fused"
    """task (elastic_kernels.tasks): fused (hard fused answer step) | recall (fused with table recall: the default
    preset's) | arithmetic (answer = last trace value)"""
    task_args: dict = field(default_factory=dict)
    """extra task keyword arguments as a JSON object, e.g. {"truncate_prob": 0.25} for fused"""
    modulus: int = 10
    """arithmetic modulus; numbers are in [0, modulus)"""
    difficulty: int = 2
    """difficulty level 1-5 (number of chained operations per problem)"""
    stage_b_difficulty: int = 0
    """difficulty in curriculum stage B (longer sequences); 0 = same as --difficulty"""
    val_size: int = 256
    """validation problems (loss and exact-match accuracy)"""
    test_size: int = 512
    """test problems for the final exact-match accuracy"""
    # model
    model: dict = field(default_factory=dict)
    """ElasticHybridConfig fields as a JSON object, merged over the preset's model (with --parent only its
    nested_choices are used)"""
    parent: str = ""
    """start from this parent instead of training stage 0: a Hugging Face NemotronH / Mamba2 save_pretrained
    directory or one of our nested checkpoint directories ("" = train the preset's model from scratch)"""
    data: str = ""
    """train on this JSONL of {prompt, thinking, answer} records (task jsonl) tokenized with the tokenizer.json of
    --parent (or of task_args.tokenizer) instead of the generated --task"""
    budgets: list[float] = _list(1.0, 0.75, 0.5)
    """target budgets as fractions of the parent's parameters (must include 1.0)"""
    budget_metric: Literal["active", "total"] = "total"
    """parameter count the budgets refer to: total (the paper's sizes) | active (top-k experts); both reported"""
    # stage 0: parent
    batch_size: int = 32
    """global batch size (split across ranks)"""
    parent_steps: int = 1000
    """stage 0 optimizer steps (parent trained from scratch)"""
    lr: float = 3e-3
    """peak learning rate of parent and baseline training (AdamW, warmup + cosine)"""
    weight_decay: float = 0.01
    """AdamW weight decay"""
    warmup_steps: int = 30
    """linear warmup steps of every stage"""
    grad_clip: float = 1.0
    """gradient norm clip (0 = off)"""
    # stage 1: importance
    importance_batches: int = 8
    """training batches of forward passes for activation importance"""
    # stage 2: Star Elastic
    elastic_steps: int = 400
    """stage 2 optimizer steps (curriculum KD with routers)"""
    elastic_lr: float = 1e-3
    """peak learning rate of the student in stage 2"""
    router_lr: float = 1e-2
    """learning rate of the routers (higher than the student's)"""
    router_hidden: int = 64
    """hidden width of each router MLP"""
    router_shared_axes: list[str] = _list("mamba_heads")
    """elastic axes whose router makes one choice for all layers (the others choose per layer): mamba_heads by
    default, since a Hugging Face NemotronH budget holds one Mamba head count (docs/interop.md); of hidden,
    mamba_heads, experts, expert_ffn, ffn"""
    router_loss_weight: float = 1.0
    """weight of the router size loss against the KD loss"""
    router_interp_targets: int = 4
    """random in-between targets per step that train the routers' blended inputs on the size loss alone"""
    router_tolerance: float = 0.02
    """tolerance band of the router size loss |params/target - 1|"""
    router_decode: Literal["feasible", "argmax"] = "feasible"
    """each budget's final shape: feasible (the routers' argmax when it is within --router-decode-tolerance of the
    target, else their most probable shape within it; docs/design.md §1) | argmax (the routers' argmax)"""
    router_decode_tolerance: float = 0.03
    """band |params/target - 1| of the feasible decode (wider than --router-tolerance: the argmax is the shape the
    distillation trained, and replacing it costs accuracy)"""
    kd_temperature: float = 1.0
    """distillation temperature of the forward KL (> 0)"""
    tau_start: float = 1.0
    """Gumbel-softmax temperature at the start of stage 2 (reference tau_init)"""
    tau_decay: float = 0.9999
    """per-step temperature decay: tau = tau_start * tau_decay**step (reference)"""
    tau_min: float = 0.05
    """floor of the Gumbel-softmax temperature"""
    hard_sample_prob: float = 0.004
    """probability per step of a hard (straight-through one-hot) Gumbel sample (reference: 1 - hard_sample_th)"""
    full_prob: float = 0.33
    """stage A probability of drawing the full model (reference original_model_sample_prob); others share the rest"""
    full_pin_weight: float = 1.0
    """weight of the loss pulling the routers' 1.0 choice to full size (budget 1.0 runs the unrouted parent)"""
    scale_start: float = 1.0
    """router logit scale at the start of stage 2"""
    scale_end: float = 10.0
    """router logit scale at the end of stage 2"""
    stage_a_fraction: float = 0.5
    """fraction of stage 2 in curriculum stage A (uniform budgets)"""
    stage_b_skew: list[float] = _list(0.5, 0.3, 0.2)
    """stage B budget probabilities: full, middle (shared), smallest"""
    # stage 3: QAD
    qad: bool = False
    """run stage 3: quantization-aware distillation and a nested quantized export"""
    qad_format: Literal["nvfp4", "fp8"] = "nvfp4"
    """fake-quant format of QAD weights"""
    qad_steps: int = 100
    """stage 3 optimizer steps"""
    qad_lr: float = 3e-4
    """stage 3 learning rate"""
    # baselines
    baselines: bool = True
    """train the baselines of each nested size below 1.0 at equal tokens: from scratch and prune+distill (the
    permuted parent sliced to the router's shape, distilled alone on the elastic stage's batches)"""
    baseline_steps: int = -1
    """baseline optimizer steps; -1 = parent_steps + elastic_steps (the tokens the nested family saw)"""
    # evaluation
    eval_caps: list[float] = field(default_factory=list)
    """thinking-token caps of the single-model baseline in the evaluation (empty = 25/50/75% of the longest
    trace)"""
    eval_latency: bool = True
    """time every budget's sliced submodel (batch 1, one thread) for the measured-latency axis"""
    # logging
    log_every: int = 10
    """steps between metric lines"""
    eval_every: int = 250
    """steps between validation evaluations (0 = only at the end of a stage)"""
    ckpt_every: int = 100
    """steps between resumable checkpoints"""
    progress: bool = True
    """show progress bars"""

    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.preset}"

    def resolved_baseline_steps(self) -> int:
        return self.parent_steps + self.elastic_steps if self.baseline_steps < 0 else self.baseline_steps

    def resolved_task(self) -> str:
        """The task name: ``"jsonl"`` with ``--data``, else ``task``."""
        return "jsonl" if self.data else self.task

    def task_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``elastic_kernels.tasks.get(self.resolved_task(), ...)``."""
        if self.data:
            return {"path": self.data, "tokenizer": self.parent, "seed": self.seed, **self.task_args}
        return {"modulus": self.modulus, "difficulty": self.difficulty, "seed": self.seed, **self.task_args}

    def validate(self) -> None:
        """Check the type and range of every field (:class:`ConfigError` naming the first bad one);
        sorts ``budgets`` from the largest down."""
        for f in fields(self):
            _check_field(f.name, f.type, getattr(self, f.name))
        b = [float(x) for x in self.budgets]
        if not b or any(not 0 < x <= 1 for x in b) or len(set(b)) != len(b):
            raise ConfigError("budgets", f"must be distinct fractions in (0, 1], got {self.budgets}")
        if max(b) != 1.0:
            raise ConfigError("budgets", f"must include the full model 1.0, got {self.budgets}")
        self.budgets = sorted(b, reverse=True)
        if len(self.stage_b_skew) != 3 or any(not (math.isfinite(p) and p >= 0) for p in self.stage_b_skew) \
                or sum(self.stage_b_skew) <= 0:
            raise ConfigError("stage_b_skew", "must be three finite probabilities >= 0 (full, middle, smallest) "
                                              f"with a positive sum, got {self.stage_b_skew}")
        if self.difficulty not in range(1, 6):
            raise ConfigError("difficulty", f"must be a level 1-5, got {self.difficulty}")
        if self.stage_b_difficulty not in range(0, 6):
            raise ConfigError("stage_b_difficulty", f"must be 0 (same as --difficulty) or a level 1-5, got "
                                                    f"{self.stage_b_difficulty}")
        bad = [a for a in self.router_shared_axes if a not in ELASTIC_AXES]
        if bad or len(set(self.router_shared_axes)) != len(self.router_shared_axes):
            raise ConfigError("router_shared_axes", f"must be distinct axes of {ELASTIC_AXES}, got "
                                                    f"{self.router_shared_axes}")
        if self.baseline_steps < -1:
            raise ConfigError("baseline_steps", f"must be >= 0, or -1 for parent + elastic steps, got "
                                                f"{self.baseline_steps}")
        if self.parallel == "fsdp" and self.qad:
            raise ConfigError("parallel", "fsdp does not run the QAD stage (its fake-quantized functional_call needs the "
                                          "full weights); use --parallel ddp with --qad")
        if self.parent and not (Path(self.parent) / "config.json").is_file():
            raise ConfigError("parent", f"must be a directory holding config.json, got {self.parent!r}")
        if self.data:
            if not Path(self.data).is_file():
                raise ConfigError("data", f"must be a JSONL file, got {self.data!r}")
            tok = self.task_args.get("tokenizer", self.parent)
            if not tok or not (Path(tok) / "tokenizer.json").is_file():
                raise ConfigError("data", f"needs a tokenizer.json in --parent or task_args.tokenizer, got {tok!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# (min, max, min inclusive, max inclusive); floats must also be finite
_RANGES: dict[str, tuple] = {
    "seed": (0, None, True, True), "procs": (1, None, True, True), "threads": (0, None, True, True),
    "stop_after": (0, None, True, True),
    "modulus": (2, None, True, True), "val_size": (1, None, True, True), "test_size": (1, None, True, True),
    "batch_size": (1, None, True, True), "parent_steps": (1, None, True, True), "lr": (0, None, False, True),
    "weight_decay": (0, None, True, True), "warmup_steps": (0, None, True, True),
    "grad_clip": (0, None, True, True), "importance_batches": (1, None, True, True),
    "elastic_steps": (1, None, True, True), "elastic_lr": (0, None, False, True), "router_lr": (0, None, False, True),
    "router_hidden": (1, None, True, True), "router_loss_weight": (0, None, True, True),
    "router_interp_targets": (0, None, True, True), "router_tolerance": (0, 1, True, False),
    "router_decode_tolerance": (0, 1, True, False),
    "kd_temperature": (0, None, False, True), "tau_start": (0, None, False, True), "tau_decay": (0, 1, False, True),
    "tau_min": (0, None, False, True), "hard_sample_prob": (0, 1, True, True), "full_prob": (0, 1, True, True),
    "full_pin_weight": (0, None, True, True),
    "scale_start": (0, None, False, True), "scale_end": (0, None, False, True),
    "stage_a_fraction": (0, 1, True, True), "qad_steps": (1, None, True, True), "qad_lr": (0, None, False, True),
    "seeds": (1, None, True, True), "log_every": (1, None, True, True), "eval_every": (0, None, True, True), "ckpt_every": (1, None, True, True),
}


def _check_field(name: str, annotation: str, value) -> None:
    t = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    if t.startswith("Literal["):
        choices = tuple(json.loads("[" + t[len("Literal["):-1].replace("'", '"') + "]"))
        if value not in choices:
            raise ConfigError(name, f"must be one of {choices}, got {value!r}")
        return
    kinds = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict, "list[float]": list,
             "list[str]": list}
    if t not in kinds:
        raise TypeError(f"TrainConfig.{name}: no check for annotation {t!r}")
    if (t in ("int", "float") and isinstance(value, bool)) or not isinstance(value, kinds[t]):
        raise ConfigError(name, f"must be {t}, got {type(value).__name__} {value!r}")
    if t == "list[float]":
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(name, f"must hold finite numbers, got {value!r}")
    if t == "list[str]" and not all(isinstance(v, str) for v in value):
        raise ConfigError(name, f"must hold strings, got {value!r}")
    if t == "dict" and not all(isinstance(k, str) for k in value):
        raise ConfigError(name, f"must have string keys, got {value!r}")
    if name not in _RANGES:
        return
    if t == "float" and not math.isfinite(value):
        raise ConfigError(name, f"must be finite, got {value}")
    lo, hi, lo_in, hi_in = _RANGES[name]
    if lo is not None and (value < lo or (value == lo and not lo_in)):
        raise ConfigError(name, f"must be {'>=' if lo_in else '>'} {lo}, got {value}")
    if hi is not None and (value > hi or (value == hi and not hi_in)):
        raise ConfigError(name, f"must be {'<=' if hi_in else '<'} {hi}, got {value}")


# Model dicts are ElasticHybridConfig keyword arguments (elastic_kernels.models).
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        difficulty=1, val_size=32, test_size=32, batch_size=8, parent_steps=6, elastic_steps=6,
        importance_batches=1, qad_steps=3, baseline_steps=4, log_every=2, eval_every=0, ckpt_every=3,
        warmup_steps=2, progress=False,
        model=dict(hidden_size=64, pattern="M-*E", mamba_heads=8, mamba_head_dim=8, mamba_groups=2,
                   mamba_state=8, mamba_chunk_size=16, moe_experts=4, moe_top_k=2, moe_ffn=64, attn_heads=2,
                   attn_kv_heads=1, ffn_size=64),
    ),
    # the default: the recall task, i.e. the fused task with table recall (answer T[f,g][r], 1000 facts, key pairs Zipf-distributed with
    # exponent 1.4) over "+" chains, 2048 test problems (a 3-point difference is significant), curriculum stage B on
    # longer chains, a router size loss strong enough to hold the targets against the distillation; budgets
    # 1.0 / 0.75 / 0.4 of the total parameters (the paper's 30B / 23B / 12B family); a parent trained 1000 steps;
    # the full model drawn often (60% of stage-A samples, 70% in stage B) so budget 1.0 stays at the parent.
    # Calibration (bench/results/main_job/README.md): with "+-*" chains the trace's arithmetic is learned at a
    # seed-dependent step (0.56 of traces right at 1000 steps in one seed), with "+" by step 250-500 in every seed
    # tried; the recall is learned in order of key frequency (at 1000 steps: the top 3 pairs ~1.0, ranks 3-9
    # 0.5-0.8, the rest near chance). The parent is exposure-limited, not capacity-limited: budget 0.75 drops
    # experts and Mamba heads at almost no cost (narrower 48-wide models did not change that). QAD (NVFP4) and its
    # PTQ baseline per budget; NemotronH's sigmoid routing, so every budget of the run exports to Hugging Face
    # (docs/interop.md); two processes (data-parallel parent and elastic stages, the baselines one per process);
    # a validation evaluation every 500 steps (monitoring only: training does not read it)
    "tiny": dict(procs=2, test_size=2048, stage_b_difficulty=3, router_loss_weight=10.0, router_tolerance=0.01,
                 eval_every=500, parent_steps=1000, budgets=[1.0, 0.75, 0.4], qad=True, full_prob=0.6,
                 stage_b_skew=[0.7, 0.2, 0.1], task="recall", model=dict(moe_score="sigmoid")),
    "small": dict(
        difficulty=4, val_size=1024, test_size=2048, batch_size=128, parent_steps=4000, elastic_steps=3000,
        importance_batches=32, eval_every=500, ckpt_every=500, lr=1e-3,
        elastic_lr=5e-4,
        model=dict(hidden_size=256, pattern="M-M*MEM-M*ME", mamba_heads=16, mamba_head_dim=32, mamba_groups=4,
                   mamba_state=32, mamba_chunk_size=64, moe_experts=16, moe_top_k=2, moe_ffn=256, attn_heads=8,
                   attn_kv_heads=2, ffn_size=1024),
    ),
}


def preset_config(preset: str = "tiny") -> TrainConfig:
    """The preset's configuration (not validated)."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"must be one of {tuple(PRESETS)}, got {preset!r}")
    cfg = TrainConfig(preset=preset)
    for k, v in PRESETS[preset].items():
        setattr(cfg, k, json.loads(json.dumps(v)) if isinstance(v, (dict, list)) else v)
    return cfg


def make_config(preset: str = "tiny", **overrides) -> TrainConfig:
    """The preset's configuration with ``overrides`` (``model`` is merged over the preset's), validated."""
    cfg = preset_config(preset)
    names = {f.name for f in fields(TrainConfig)}
    for k, v in overrides.items():
        if k not in names:
            raise ValueError(f"unknown config field {k!r}; known: {sorted(names)}")
        if k == "model":
            cfg.model = {**cfg.model, **v}
        else:
            setattr(cfg, k, v)
    cfg.validate()
    return cfg
