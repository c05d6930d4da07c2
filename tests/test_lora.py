"""LoRA (redi_ds.lora) under ZeRO-3 and ZeRO-2: only the adapters train, the merged export is the base plus the
adapter, checkpoints hold the adapters and resume exactly, and REDI continues from a LoRA SFT."""

from __future__ import annotations

import pytest
import torch
from trainutil import FAST, losses, torchrun

LORA = ["--model.lora.r", "4", "--model.lora.alpha", "8"]


def test_only_adapters_train_and_the_head_is_frozen():
    from redi_ds import lora
    from redi_ds.config import load_config
    from redi_ds.kernels import FusedHeadOptions
    from redi_ds.losses import build_loss
    from redi_ds.model import PolicyModel, build_model

    cfg = load_config("tiny", stage="sft", overrides=FAST[2:] + LORA)
    hf = lora.apply(build_model(cfg.model, "tiny", torch.float32, seed=0), cfg.model.lora)
    policy = PolicyModel(hf, build_loss(cfg.loss), FusedHeadOptions(impl="torch"))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not policy.head.weight.requires_grad  # the fused head skips its d(weight) pass


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    sft = ["--stage", "sft", *FAST, *LORA, "--train.max_steps", "4", "--train.save_every", "2", "--train.lr", "1e-2"]
    torchrun([*sft, "--run.output_dir", str(tmp / "whole")], tmp)
    torchrun([*sft, "--run.output_dir", str(tmp / "cut"), "--train.stop_after_steps", "2"], tmp)
    resumed = torchrun([*sft, "--run.output_dir", str(tmp / "cut")], tmp)
    redi = torchrun(["--stage", "redi", *FAST, *LORA, "--train.max_steps", "2", "--model.sft_if_missing", "false",
                     "--run.output_dir", str(tmp / "whole")], tmp)
    return tmp, resumed, redi


@pytest.mark.slow
def test_lora_resumes_to_the_uninterrupted_losses(lora_runs):
    tmp, resumed, _ = lora_runs
    assert "resumed from" in resumed.stdout
    assert losses(tmp / "cut" / "sft") == pytest.approx(losses(tmp / "whole" / "sft"), rel=1e-6, abs=1e-7)
    ckpt = tmp / "whole" / "sft" / "checkpoints" / "step_4"
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 512 * 1024  # the adapters, not the base


@pytest.mark.slow
def test_merged_export_is_the_base_plus_the_adapter(lora_runs):
    import transformers
    from peft import PeftModel

    from redi_ds.config import load_config
    from redi_ds.model import build_model, load_tokenizer

    tmp, _, _ = lora_runs
    export = tmp / "whole" / "sft" / "export"
    cfg = load_config("tiny", stage="sft", overrides=FAST[2:] + LORA)
    base = build_model(cfg.model, "tiny", torch.float32, seed=cfg.run.seed, tokenizer=load_tokenizer(cfg.model, "tiny"))
    with_adapter = PeftModel.from_pretrained(base, str(export / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = torch.randint(1, 30, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    untrained = build_model(cfg.model, "tiny", torch.float32, seed=cfg.run.seed,
                            tokenizer=load_tokenizer(cfg.model, "tiny")).eval()
    with torch.no_grad():
        assert (untrained(input_ids=ids).logits - a).abs().max() > 1e-3  # the adapter moved the model


@pytest.mark.slow
def test_redi_continues_from_a_lora_sft_with_a_new_adapter(lora_runs):
    tmp, _, redi = lora_runs
    assert "LoRA r=4" in redi.stdout and (tmp / "whole" / "redi" / "done").exists()
    assert (tmp / "whole" / "redi" / "export" / "adapter" / "adapter_config.json").is_file()
    assert len(losses(tmp / "whole" / "redi")) == 2


@pytest.mark.slow
def test_lora_under_zero2(tmp_path):
    torchrun(["--stage", "sft", *FAST, *LORA, "--train.max_steps", "2", "--deepspeed.config", "zero2",
              "--deepspeed.zero", "{}", "--run.output_dir", str(tmp_path)], tmp_path)
    assert (tmp_path / "sft" / "export" / "adapter" / "adapter_model.safetensors").is_file()
