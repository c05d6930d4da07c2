"""One typed config tree: YAML recipes + dotted CLI overrides, validated before any compute.

A recipe file has shared sections (``run``, ``model``, ``data``, ``train``, ``loss``, ``kernel``,
``deepspeed``, ``tracking``) and a ``stages`` mapping whose entries override them per stage::

    model: {name_or_path: Qwen/Qwen2.5-Math-1.5B}
    stages:
      sft:  {train: {lr: 5.0e-5}, loss: {name: sft}}
      redi: {train: {lr: 1.0e-6}, loss: {name: redi, alpha: 0.8}}

``load_config("paper", stage="redi", overrides=["--loss.alpha", "0.5"])`` returns the resolved
:class:`Config`. Unknown keys and wrong types raise :class:`ConfigError` with a one-line message
naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import yaml

from redi_ds.errors import ConfigError
from redi_ds.eval.options import EvalOptions
from redi_ds.kernels.options import FusedHeadOptions
from redi_ds.losses import LOSSES, loss_config
from redi_ds.textio import load_yaml
from redi_ds.typed import SECTIONS, from_dict

PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs/run"  # each stage writes under {output_dir}/{stage}
    seed: int = 42
    resume: str = "auto"  # auto: resume from the stage dir's latest complete checkpoint; never; or a path


@dataclass
class TinyModelConfig:
    """The embedded default: a Qwen2-architecture model built from this config (no download)."""

    hidden_size: int = 64
    intermediate_size: int = 192
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 151936
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass
class LoraConfig:
    """LoRA adapters (peft): r > 0 trains rank-r adapters on target_modules and freezes the rest (redi_ds.lora)."""

    r: int = 0  # 0: off, full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # peft's all-linear: never the head


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # "tiny", a hub name, or a local HF folder (e.g. an SFT export)
    tokenizer: Optional[str] = None  # None: the model's own; "qwen2.5": the bundled Qwen2.5 tokenizer; or a path
    chat_template: Optional[str] = None  # None: the tokenizer's own; "qwen2.5-math"; or a .jinja path
    sft_if_missing: bool = False  # when name_or_path is a missing SFT export, run the sft stage first
    attn_implementation: str = "auto"  # auto: what the family supports (flash-attention 2 on CUDA, sdpa, eager)
    liger: str = "auto"  # auto | on | off: Liger-Kernel's body kernels for this family (Liger's own table), on CUDA
    gradient_checkpointing: bool = False
    rope_theta: Optional[float] = None  # override the model config's value
    max_position_embeddings: Optional[int] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    path: str = ""  # JSONL file, save_to_disk folder, a prepare output folder, "synthetic", or an HF dataset name
    split: str = "train"
    format: str = "auto"  # auto | plain | messages: rows of strings, or chat messages (redi_ds.data.conversation)
    train_on: str = "all"  # messages SFT: all assistant turns, or last_turn (pairs train the final turn)
    # None: no system turn beyond the template's default; a conversation's own system turn wins over this
    system_prompt: Optional[str] = PAPER_SYSTEM_PROMPT
    max_prompt_length: int = 800  # tokens; longer examples are skipped and counted
    max_length: int = 4096  # prompt + response tokens; longer examples are skipped and counted
    padding_free: bool = False  # pack a micro batch into one row with position_ids
    shuffle: bool = True
    limit: int = 0  # >0: use only the first N examples (after loading)
    synthetic_size: int = 256  # examples the procedural teacher writes when path == "synthetic"


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0  # >0 caps the number of optimizer steps
    global_batch_size: int = 8  # examples (SFT rows or pairs) per optimizer step across all ranks
    micro_batch_size: int = 1  # examples per rank per forward
    lr: float = 1e-5
    min_lr_ratio: float = 0.0
    schedule: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints of this run kept; 0: keep all
    export: bool = True  # HF-format export (safetensors + tokenizer) at the end
    max_nonfinite_steps: int = 2  # this many consecutive steps with a NaN/inf loss or grad norm stop the run
    stop_after_steps: int = 0  # testing aid: exit cleanly (with a checkpoint) after N steps, like a preemption


@dataclass
class TeacherConfig:
    """The distill stage's teacher: held once per rank, no gradient; its tokenizer must be the student's."""

    name_or_path: str = ""  # a hub name, a folder, "@stage" (a finished stage's export), or "tiny" (model.tiny)
    seed: int = 1234  # "tiny": the random teacher's init (a model other than the student)


@dataclass
class RolloutConfig:
    """How the distill stage samples from the student (redi_ds.rollout)."""

    samples: int = 4  # completions per prompt
    temperature: float = 1.0  # 1: samples from the student itself (the estimator's assumption)
    top_p: float = 1.0
    max_new_tokens: int = 256
    backend: str = "hf"  # hf (the student's own forward, under ZeRO-3 too) | vllm (CUDA, colocated) | auto
    log_every: int = 10  # steps between logged samples (rollouts.jsonl in the stage dir, MLflow artifacts)
    gpu_memory_utilization: float = 0.3  # vllm: its share of the GPU beside training


@dataclass
class DeepSpeedConfig:
    config: str = "zero3"  # name in ds_configs/ (zero3, zero2, zero3_offload) or a JSON path
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    zero: dict = field(default_factory=dict)  # merged into zero_optimization (e.g. stage3_param_persistence_threshold)
    sequence_parallel_size: int = 1  # N > 1: DeepSpeed's Ulysses; the world is N-way SP x (world / N) data parallel


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///{output_dir}/mlflow.db
    experiment: str = "redi-ds"
    run_name: Optional[str] = None  # None: {run.name}/{stage}
    parent_run_id: Optional[str] = None  # nest this run under another (the ablation's parent run)
    tags: dict = field(default_factory=dict)  # extra tags (the ablation's branch and seed)


@dataclass
class EvalConfig(EvalOptions):
    """Evaluation of the export at the end of training: ``benchmarks`` plus the options of ``run_eval``
    (redi_ds.eval.EvalOptions). ``system_prompt`` defaults to the training run's ``data.system_prompt``."""

    benchmarks: list[str] = field(default_factory=list)  # empty: no evaluation
    max_new_tokens: int = 512
    heldout_pairs: str = ""  # pairs (prompt, chosen, rejected) whose length-normalised log-probs are tracked,
    #                          or "synthetic": the embedded default's 32 bundled held-out pairs
    heldout_every: int = 0  # optimizer steps between those probes (0: never); written to heldout.jsonl


@dataclass
class Config:
    stage: str = "redi"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the loss's own section (redi_ds.losses: REDIConfig, DPOConfig, ...), chosen by its ``name``
    loss: Any = field(default_factory=lambda: loss_config("redi"), metadata={"by_name": "loss_section"})
    kernel: FusedHeadOptions = field(default_factory=FusedHeadOptions)  # the fused head (redi_ds.kernels)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # the distill stage
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the distill stage

    @property
    def stage_dir(self) -> Path:
        return Path(self.run.output_dir) / self.stage

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict) and obj:
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = obj

        walk("", self.to_dict())
        return out


# ----------------------------------------------------------------------------- loading


def config_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("redi_ds.configs").iterdir() if p.name.endswith(".yaml"))


def _locate(name_or_path: str) -> tuple[str, bytes]:
    """Return (source label, YAML bytes) for a bundled config name or a file path."""
    if os.path.isdir(name_or_path):
        raise ConfigError(f"--config {name_or_path!r} is a folder; name a YAML file or a bundled config "
                          f"({', '.join(config_names())})")
    if os.path.exists(name_or_path):
        try:
            return name_or_path, Path(name_or_path).read_bytes()
        except OSError as e:
            raise ConfigError(f"--config {name_or_path!r}: cannot read it ({e.strerror})") from None
    res = resources.files("redi_ds.configs").joinpath(f"{name_or_path}.yaml")
    if res.is_file():
        return f"redi_ds/configs/{name_or_path}.yaml", res.read_bytes()
    raise ConfigError(f"config {name_or_path!r}: no such file and no bundled config of that name "
                      f"(bundled: {', '.join(config_names())})")


def _by_name_sections() -> set[str]:
    """Sections whose type is chosen by their ``name`` (the loss): another name starts a fresh section."""
    return {f.name for f in dataclasses.fields(Config) if "by_name" in f.metadata}


def _deep_merge(base: dict, over: dict, top: bool = True) -> dict:
    """``over`` on top of ``base``. A by-name section whose ``name`` changes is replaced, not merged: the options
    of the loss below (alpha, say) are not options of the new one."""
    out = dict(base)
    fresh = _by_name_sections() if top else set()
    for k, v in over.items():
        if k in fresh and isinstance(v, dict) and isinstance(out.get(k), dict) \
                and v.get("name", out[k].get("name")) != out[k].get("name"):
            out[k] = dict(v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v, top=False)
        else:
            out[k] = v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override --{dotted}: {p!r} is not a section")
    node[parts[-1]] = value


_FLAG = re.compile(r"--[A-Za-z_]")  # the next option, never a value ("-1", "-.5" and "--" stay values)


def parse_overrides(argv: list[str]) -> list[tuple[str, Any]]:
    """``["--loss.alpha", "0.5", "--train.lr=1e-6"]`` -> ``[("loss.alpha", 0.5), ("train.lr", 1e-6)]``."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or len(tok) < 3:
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.key value")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv) or _FLAG.match(argv[i + 1]):
                raise ConfigError(f"override --{key} has no value")
            raw = argv[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def load_config(name_or_path: str = "tiny", stage: Optional[str] = None,
                overrides: Optional[list[str]] = None, settings: Optional[dict[str, Any]] = None) -> Config:
    """``overrides``: command-line style (``["--loss.alpha", "0.5"]``); ``settings``: the same as values
    (``{"loss.alpha": 0.5}``), applied after them (for programs that compose configs, like the ablation)."""
    source, data = _locate(name_or_path)
    raw = load_yaml(data, source) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping")
    stages = raw.pop("stages", {}) or {}
    if not isinstance(stages, dict):
        raise ConfigError(f"{source}: 'stages' must be a mapping of stage name -> overrides")
    for name, entry in stages.items():
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"{source}: stages.{name} must be a mapping of overrides, got {entry!r}")
    if stage is None:
        stage = raw.get("stage") or next(iter(stages), "redi")
    if stages and stage not in stages:
        raise ConfigError(f"{source}: no stage {stage!r} (stages: {', '.join(stages)})")
    merged = _deep_merge(raw, stages.get(stage) or {})
    merged["stage"] = stage
    layer = parse_overrides(overrides or []) + list((settings or {}).items())
    for section in _by_name_sections():  # another loss named here: the options below belong to the old one
        names = [v for k, v in layer if k == f"{section}.name"]
        if names and isinstance(merged.get(section), dict) and merged[section].get("name") != names[-1]:
            merged[section] = {}
    for key, value in layer:
        _set_dotted(merged, key, value)
    _inherit(merged, "eval.system_prompt", "data.system_prompt")  # evaluate with the prompt it trained on
    cfg = from_dict(Config, merged, source=source)
    from redi_ds.config_checks import validate  # (it imports this module's sections)

    validate(cfg, source)
    cfg._source = source  # type: ignore[attr-defined]
    cfg._stages = list(stages)  # type: ignore[attr-defined]
    return cfg


def _inherit(tree: dict, key: str, source: str) -> None:
    """``key`` takes ``source``'s value unless it is set itself (both dotted, two levels)."""
    (ks, kk), (ss, sk) = key.split("."), source.split(".")
    node, src = tree.get(ks), tree.get(ss)
    if isinstance(src, dict) and sk in src and not (isinstance(node, dict) and kk in node):
        if node is not None and not isinstance(node, dict):
            return  # from_dict reports the bad section
        tree.setdefault(ks, {})[kk] = src[sk]


def stage_names(name_or_path: str) -> list[str]:
    source, data = _locate(name_or_path)
    raw = load_yaml(data, source) or {}
    return list((raw.get("stages") if isinstance(raw, dict) else None) or {})


# ----------------------------------------------------------------------------- the loss section


def _loss_section(value: Any, where: str) -> Any:
    """The ``loss`` section as its loss's own config dataclass, chosen by ``name``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
    name = value.get("name", Config().loss.name)
    if name not in LOSSES:
        raise ConfigError(f"{where}.name = {name!r}; expected one of {', '.join(sorted(LOSSES))}")
    return from_dict(LOSSES[name].Config, value, prefix=where)


SECTIONS["loss_section"] = _loss_section


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """world / deepspeed.sequence_parallel_size; a one-line error when it does not divide."""
    n = cfg.deepspeed.sequence_parallel_size
    if world_size % n:
        src = getattr(cfg, "_source", "config")
        raise ConfigError(f"{src}: the world size ({world_size}) is not divisible by deepspeed.sequence_parallel_size "
                          f"({n})")
    return world_size // n


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Accumulation steps so that micro * accum * data-parallel size == global; a one-line error otherwise.
    With sequence parallelism the ranks of an SP group share their micro batches: the data-parallel size is
    world / N."""
    t = cfg.train
    dp = data_parallel_size(cfg, world_size)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        src = getattr(cfg, "_source", "config")
        by = f"data-parallel size ({dp} = world {world_size} / sequence_parallel_size " \
             f"{cfg.deepspeed.sequence_parallel_size})" if cfg.deepspeed.sequence_parallel_size > 1 \
            else f"world size ({world_size})"
        raise ConfigError(
            f"{src}: train.global_batch_size ({t.global_batch_size}) is not divisible by "
            f"train.micro_batch_size ({t.micro_batch_size}) x {by}")
    return t.global_batch_size // per_step


def save_config(cfg: Config, path: os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
