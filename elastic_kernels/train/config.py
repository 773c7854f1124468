"""Run configuration: one dataclass, three presets, CLI overrides with help for every field."""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["TrainConfig", "PRESETS", "build_parser", "config_from_args"]


def _f(default, help: str, **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # run
    preset: str = _f("tiny", "preset the other fields start from: smoke (seconds), tiny (CPU minutes), small (GPU)")
    run_dir: str = _f("", "output directory (default runs/<preset>); holds config, metrics.jsonl, checkpoints, report")
    seed: int = _f(0, "seed of the model init, data splits, batches, budget sampling and Gumbel noise")
    device: str = _f("auto", "auto | cpu | cuda (under torchrun, cuda:<local rank>)")
    threads: int = _f(1, "torch CPU threads per process (0 = torch default); the tiny model runs fastest on one")
    resume: bool = _f(False, "continue the run in run_dir from its last checkpoint")
    stop_after: int = _f(0, "stop (with a resumable checkpoint) after this many optimizer steps in this "
                            "invocation; 0 = run to the end. For tests of interruption")
    # task
    task: str = _f("fused", "generated task (elastic_kernels.tasks): fused (chain arithmetic whose answer is one hard "
                            "fused step; thinking caps trained) | arithmetic (the answer copies the trace's last value)")
    task_args: dict = _f({}, "extra task keyword arguments as JSON, e.g. {\"truncate_prob\": 0.25} for fused")
    modulus: int = _f(10, "arithmetic modulus; numbers are in [0, modulus)")
    difficulty: int = _f(2, "difficulty level 1-5 (number of chained operations per problem)")
    stage_b_difficulty: int = _f(0, "difficulty in curriculum stage B (longer sequences); 0 = same as difficulty")
    val_size: int = _f(256, "validation problems (loss and exact-match accuracy)")
    test_size: int = _f(512, "test problems for the final exact-match accuracy")
    # model
    model: dict = _f({}, "ElasticHybridConfig fields as JSON, merged over the preset's model")
    budgets: list = _f([1.0, 0.75, 0.5], "target budgets as fractions of the parent's parameters (comma list)")
    budget_metric: str = _f("total", "which parameter count the budgets refer to: total (the paper's sizes) | "
                                     "active (top-k experts; leaves the expert count free); both are reported")
    # stage 0: parent
    batch_size: int = _f(32, "global batch size (split across ranks)")
    parent_steps: int = _f(1000, "stage 0 optimizer steps (parent trained from scratch)")
    lr: float = _f(3e-3, "peak learning rate of parent and baseline training (AdamW, warmup + cosine)")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    warmup_steps: int = _f(30, "linear warmup steps of every stage")
    grad_clip: float = _f(1.0, "gradient norm clip (0 = off)")
    # stage 1: importance
    importance_batches: int = _f(8, "training batches of forward passes for activation importance")
    # stage 2: Star Elastic
    elastic_steps: int = _f(400, "stage 2 optimizer steps (curriculum KD with routers)")
    elastic_lr: float = _f(1e-3, "peak learning rate of the student in stage 2")
    router_lr: float = _f(1e-2, "learning rate of the routers (higher than the student's)")
    router_hidden: int = _f(64, "hidden width of each router MLP")
    router_loss_weight: float = _f(1.0, "weight of the router size loss against the KD loss")
    router_interp_targets: int = _f(4, "random in-between targets per step that train the routers' blended "
                                        "budget inputs on the size loss alone (0 = only the trained budgets)")
    router_tolerance: float = _f(0.02, "tolerance band of the router size loss |params/target - 1|")
    kd_temperature: float = _f(1.0, "distillation temperature of the forward KL")
    tau_start: float = _f(1.0, "Gumbel-softmax temperature at the start of stage 2 (reference tau_init)")
    tau_decay: float = _f(0.9999, "per-step temperature decay: tau = tau_start * tau_decay**step (reference)")
    tau_min: float = _f(0.05, "floor of the Gumbel-softmax temperature")
    hard_sample_prob: float = _f(0.004, "probability per step of a hard (straight-through one-hot) Gumbel sample "
                                        "(reference: 1 - hard_sample_th = 0.004)")
    full_prob: float = _f(0.33, "curriculum stage A probability of drawing the full model (reference "
                                "original_model_sample_prob); the other budgets share the rest")
    full_pin_weight: float = _f(1.0, "weight of the loss pulling the routers' 1.0 choice to the full size (budget "
                                     "1.0 itself always runs the unrouted parent)")
    scale_start: float = _f(1.0, "router logit scale at the start of stage 2")
    scale_end: float = _f(10.0, "router logit scale at the end of stage 2")
    stage_a_fraction: float = _f(0.5, "fraction of stage 2 in curriculum stage A (uniform budgets)")
    stage_b_skew: list = _f([0.5, 0.3, 0.2], "stage B budget probabilities: full, middle (shared), smallest")
    # stage 3: QAD
    qad: bool = _f(False, "run stage 3: quantization-aware distillation and a nested quantized export")
    qad_format: str = _f("nvfp4", "fake-quant format of QAD weights: nvfp4 | fp8")
    qad_steps: int = _f(100, "stage 3 optimizer steps")
    qad_lr: float = _f(3e-4, "stage 3 learning rate")
    # baselines
    baselines: bool = _f(True, "train an independent model of each nested size from scratch")
    baseline_steps: int = _f(-1, "baseline optimizer steps; -1 = parent_steps + elastic_steps (same tokens "
                                 "as the nested family saw)")
    # logging
    log_every: int = _f(10, "steps between metric lines")
    eval_every: int = _f(250, "steps between validation evaluations (0 = only at the end of a stage)")
    ckpt_every: int = _f(100, "steps between resumable checkpoints")
    progress: bool = _f(True, "show tqdm progress bars")

    def resolved_run_dir(self) -> str:
        return self.run_dir or f"runs/{self.preset}"

    def resolved_baseline_steps(self) -> int:
        return self.parent_steps + self.elastic_steps if self.baseline_steps < 0 else self.baseline_steps

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        if self.budget_metric not in ("active", "total"):
            raise ValueError(f"budget_metric must be 'active' or 'total', got {self.budget_metric!r}")
        from ..tasks import names as task_names
        if self.task not in task_names():
            raise ValueError(f"task must be one of {task_names()}, got {self.task!r}")
        if not 0 < self.tau_decay <= 1 or self.tau_min <= 0 or self.tau_start <= 0:
            raise ValueError(f"tau_start and tau_min must be > 0 and tau_decay in (0, 1], got {self.tau_start}, "
                             f"{self.tau_min}, {self.tau_decay}")
        for name in ("hard_sample_prob", "full_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.qad_format not in ("nvfp4", "fp8"):
            raise ValueError(f"qad_format must be 'nvfp4' or 'fp8', got {self.qad_format!r}")
        b = [float(x) for x in self.budgets]
        if not b or any(not 0 < x <= 1 for x in b) or len(set(b)) != len(b):
            raise ValueError(f"budgets must be distinct fractions in (0, 1], got {self.budgets}")
        if max(b) != 1.0:
            raise ValueError(f"budgets must include the full model 1.0, got {self.budgets}")
        self.budgets = sorted(b, reverse=True)
        if len(self.stage_b_skew) != 3:
            raise ValueError(f"stage_b_skew must have three entries (full, middle, smallest), got {self.stage_b_skew}")
        for name in ("batch_size", "parent_steps", "elastic_steps", "log_every", "ckpt_every", "val_size",
                     "test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.stage_a_fraction <= 1:
            raise ValueError(f"stage_a_fraction must be in [0, 1], got {self.stage_a_fraction}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto | cpu | cuda, got {self.device!r}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


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
    "tiny": dict(model={}),
    "small": dict(
        difficulty=4, val_size=1024, test_size=2048, batch_size=128, parent_steps=4000, elastic_steps=3000,
        importance_batches=32, eval_every=500, ckpt_every=500, lr=1e-3,
        elastic_lr=5e-4,
        model=dict(hidden_size=256, pattern="M-M*MEM-M*ME", mamba_heads=16, mamba_head_dim=32, mamba_groups=4,
                   mamba_state=32, mamba_chunk_size=64, moe_experts=16, moe_top_k=2, moe_ffn=256, attn_heads=8,
                   attn_kv_heads=2, ffn_size=1024),
    ),
}


def _parse_value(f: dataclasses.Field, text: str):
    t = f.type if isinstance(f.type, str) else f.type.__name__
    if t == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"--{f.name}: expected true/false, got {text!r}")
    if t == "int":
        return int(text)
    if t == "float":
        return float(text)
    if t == "list":
        return [float(x) for x in text.split(",") if x.strip()]
    if t == "dict":
        try:
            v = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--{f.name}: expected a JSON object: {e}") from e
        if not isinstance(v, dict):
            raise argparse.ArgumentTypeError(f"--{f.name}: expected a JSON object, got {text!r}")
        return v
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elastic-train",
        description="Star Elastic reference loop: stage 0 parent, stage 1 importance + permutation, "
                    "stage 2 router + curriculum distillation of all nested budgets, stage 3 (--qad) "
                    "quantization-aware distillation, independent baselines, and a report "
                    "(report.md / report.json / report.png) in the run directory.",
        epilog="Presets override the tiny defaults shown above: " + "; ".join(
            f"{name}: " + (", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(over.items())) or "(none)")
            for name, over in PRESETS.items()) + ". Explicit options override the preset.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        d = getattr(defaults, f.name)
        shown = ",".join(str(x) for x in d) if isinstance(d, list) else (json.dumps(d) if isinstance(d, dict) else d)
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS,
                                  help=f.metadata["help"] + f" (tiny default: {shown})")
        if f.name == "resume":
            kw.update(action="store_true")
        elif f.name == "preset":
            kw.update(choices=list(PRESETS))
        else:
            kw.update(type=lambda s, f=f: _parse_value(f, s), metavar=(f.type if isinstance(f.type, str)
                                                                          else f.type.__name__).upper())
        p.add_argument(flag, **kw)
    return p


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    """Preset defaults, then explicit command-line overrides; validated."""
    ns = vars(build_parser().parse_args(argv))
    return make_config(ns.pop("preset", "tiny"), **ns)


def make_config(preset: str = "tiny", **overrides) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    cfg = TrainConfig(preset=preset)
    base = dict(PRESETS[preset])
    model = dict(base.pop("model", {}))
    for k, v in base.items():
        setattr(cfg, k, v)
    names = {f.name for f in fields(TrainConfig)}
    for k, v in overrides.items():
        if k not in names:
            raise ValueError(f"unknown config field {k!r}")
        if k == "model":
            model.update(v)
        else:
            setattr(cfg, k, v)
    cfg.model = model
    cfg.validate()
    return cfg
