"""LoRA (PEFT) adapters: ``model.lora.r > 0`` trains low-rank adapters on ``model.lora.target_modules`` and freezes
everything else, under ZeRO-2 and ZeRO-3.

- **The head stays exact and costs less.** The LM head is frozen (peft's ``all-linear`` never adapts it), so the
  fused head's single pass skips its d(weight) matmul: a third of the head's FLOPs (kernels/BENCHMARKS.md).
- **Precision.** peft would upcast the adapters to fp32 beside a bf16 base (``autocast_adapter_dtype``); ZeRO-3
  partitions and gathers parameters in one compute dtype, so the adapters are kept in the base's dtype and
  DeepSpeed's bf16 optimizer keeps fp32 master copies of them (the updates are never lost to bf16 rounding).
- **Checkpoints hold the adapters only** (DeepSpeed's ``exclude_frozen_parameters``); the frozen base is rebuilt
  from the same model on resume, so a resumed run continues exactly.
- **Export**: ``export/`` is the merged model (``AutoModelForCausalLM.from_pretrained``; what ``@sft`` starts the
  next stage from: REDI with LoRA trains a new adapter on the merged SFT model) and ``export/adapter/`` the adapter
  alone (``PeftModel.from_pretrained(base, "export/adapter")``).
"""

from __future__ import annotations

from redi_ds.errors import ConfigError


def enabled(lora_cfg) -> bool:
    return lora_cfg.r > 0


def peft_config(lora_cfg):
    from peft import LoraConfig, TaskType

    targets = lora_cfg.target_modules
    return LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else list(targets),
                      task_type=TaskType.CAUSAL_LM)


def apply(hf_model, lora_cfg):
    """The model with adapters injected and the rest frozen (a PeftModel), or the model itself when LoRA is off."""
    if not enabled(lora_cfg):
        return hf_model
    try:
        from peft import get_peft_model
    except ImportError:
        raise ConfigError("model.lora: the peft library is not installed (pip install peft)") from None
    try:
        model = get_peft_model(hf_model, peft_config(lora_cfg), autocast_adapter_dtype=False)
    except ValueError as e:  # e.g. target modules that match nothing
        raise ConfigError(f"model.lora: {' '.join(str(e).split())[:300]}") from None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    from redi_ds.ranks import log0

    log0(f"LoRA r={lora_cfg.r} on {lora_cfg.target_modules}: {trainable:,} trainable of {total:,} parameters "
         f"({100 * trainable / max(1, total):.2f}%)")
    return model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def export(fresh_base, peft_model, state_dict: dict, out_dir: str):
    """Load a full PolicyModel state dict (``hf.`` stripped) into a fresh base wrapped like ``peft_model``; write the
    adapter to ``out_dir/adapter`` and return the merged model (the caller saves it to ``out_dir``)."""
    from peft import get_peft_model

    wrapped = get_peft_model(fresh_base, peft_model.peft_config["default"], autocast_adapter_dtype=False)
    missing, unexpected = wrapped.load_state_dict(state_dict, strict=False)
    tied = bool(getattr(fresh_base.config, "tie_word_embeddings", False))
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]  # a tied head is its embedding
    if missing or unexpected:
        raise RuntimeError(f"export: LoRA state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    wrapped.save_pretrained(f"{out_dir}/adapter", safe_serialization=True)
    return wrapped.merge_and_unload()
