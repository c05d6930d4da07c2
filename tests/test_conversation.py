"""Conversational `messages` rows (redi_ds.data.conversation): masks from the chat template, never from searching
the rendered text; pairs in the messages layout encode and train exactly like plain pairs."""

from __future__ import annotations

import json

import pytest
import torch

from redi_ds.config import ModelConfig
from redi_ds.data import DataError
from redi_ds.data.collate import collate
from redi_ds.data.layout import PAIRS, SFT_ROWS
from redi_ds.data.sources import load_source
from redi_ds.data.tokenize import ChatEncoder, encode_dataset
from redi_ds.model import load_tokenizer

QWEN3_LIKE = ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
              "{%- if m['role'] == 'assistant' and loop.last and m.get('reasoning_content') -%}"
              "{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif -%}"
              "{{ m['content'] + '<|im_end|>\\n' }}{%- endfor -%}"
              "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
# the same, with the assistant's tokens marked by the template itself
MARKED = ("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' }}"
          "{% generation %}{%- if loop.last and m.get('reasoning_content') -%}"
          "{{ '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif -%}"
          "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
          "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
          "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")

CONVERSATION = [{"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "2 + 3 = 5. The answer is \\boxed{5}."},
                {"role": "user", "content": "And times 4?"},
                {"role": "assistant", "content": "5 * 4 = 20, so \\boxed{20}."}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelConfig(tokenizer="qwen2.5"), "tiny")  # Qwen2.5's own template: no markers


def _with_template(tok, template):
    import copy

    t = copy.copy(tok)
    t.chat_template = template
    return t


def _encode(tmp_path, rows, layout, encoder, name="d.jsonl"):
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, report = encode_dataset(load_source(str(f), layout), layout, encoder, 512, 2048)
    assert report.kept == len(rows), report.line()
    return data


def _trained_ids(example) -> list[int]:
    batch = collate([example], SFT_ROWS, pad_id=0)
    t = batch["targets"][0]
    return t[t != -100].tolist()


def _independent(tok, turns) -> list[int]:
    """Each assistant turn's content tokens and its end-of-turn token, tokenized on their own."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    return [i for m in turns for i in tok(m["content"], add_special_tokens=False)["input_ids"] + [end]]


@pytest.mark.parametrize("template", ["qwen2.5 (no markers)", "generation markers"])
def test_multi_turn_sft_trains_exactly_the_assistant_turns(tmp_path, tok, template):
    t = tok if template.startswith("qwen") else _with_template(tok, MARKED)
    data = _encode(tmp_path, [{"messages": CONVERSATION}], SFT_ROWS, ChatEncoder(t, None))
    assistants = [m for m in CONVERSATION if m["role"] == "assistant"]
    expected = _independent(tok, assistants)
    assert _trained_ids(data[0]) == expected and data[0]["num_targets"] == len(expected)
    last = _encode(tmp_path, [{"messages": CONVERSATION}], SFT_ROWS, ChatEncoder(t, None, train_on="last_turn"))
    assert _trained_ids(last[0]) == _independent(tok, assistants[-1:])


def test_pairs_in_the_messages_layout_train_like_plain_pairs(tmp_path, tok):
    from redi_ds.kernels import FusedHeadOptions
    from redi_ds.losses import StepTotals, build_loss, loss_config
    from redi_ds.model import PolicyModel, build_model

    plain = [{"prompt": f"Compute {i} + 1.", "chosen": f"{i} + 1 = {i + 1}, \\boxed{{{i + 1}}}",
              "rejected": f"{i} + 1 = {i + 2}, \\boxed{{{i + 2}}}"} for i in range(3)]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": {"role": "assistant", "content": r["chosen"]},
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in plain]
    enc = ChatEncoder(tok, "Please reason step by step.")
    a, b = _encode(tmp_path, plain, PAIRS, enc, "p.jsonl"), _encode(tmp_path, conv, PAIRS, enc, "c.jsonl")
    for x, y in zip(a, b):
        assert (x["prompt_ids"], x["chosen_ids"], x["rejected_ids"]) == (y["prompt_ids"], y["chosen_ids"],
                                                                          y["rejected_ids"])
    model = PolicyModel(build_model(ModelConfig(), "tiny", torch.float64, seed=1, tokenizer=tok),
                        build_loss(loss_config("redi")), FusedHeadOptions(impl="torch"))
    totals = StepTotals(examples=3, tokens=0)
    losses = [model(collate(list(d), PAIRS, tok.pad_token_id), totals)[0].item() for d in (a, b)]
    assert losses[0] == losses[1]


def test_a_conversations_own_system_turn_wins(tmp_path, tok):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}] + CONVERSATION[:2]}]
    data = _encode(tmp_path, rows, SFT_ROWS, ChatEncoder(tok, "Please reason step by step."))
    text = tok.decode(data[0]["prompt_ids"])
    assert "Be brief." in text and "Please reason" not in text


def test_reasoning_of_the_last_turn_is_trained_and_a_dropped_one_is_not(tmp_path, tok):
    """Qwen3-style templates render reasoning_content for the last assistant turn only: it is trained there; an
    earlier turn's block, which the template drops once later turns follow, is never trained as if rendered."""
    turns = [{"role": "user", "content": "q1"},
             {"role": "assistant", "content": "a1", "reasoning_content": "EARLIER THOUGHTS"},
             {"role": "user", "content": "q2"},
             {"role": "assistant", "content": "a2", "reasoning_content": "FINAL THOUGHTS"}]
    thoughts = {k: tok(f"{k} THOUGHTS", add_special_tokens=False)["input_ids"] for k in ("EARLIER", "FINAL")}

    def contains(ids, sub):
        return any(ids[i:i + len(sub)] == sub for i in range(len(ids)))

    qwen3 = _with_template(tok, QWEN3_LIKE)
    last = _encode(tmp_path, [{"messages": turns}], SFT_ROWS, ChatEncoder(qwen3, None, train_on="last_turn"))
    trained = _trained_ids(last[0])
    assert contains(trained, thoughts["FINAL"]) and not contains(trained, thoughts["EARLIER"])
    with pytest.raises(DataError, match=r"renders an earlier assistant turn differently once later turns follow"):
        _encode(tmp_path, [{"messages": turns}], SFT_ROWS, ChatEncoder(qwen3, None))
    marked = _encode(tmp_path, [{"messages": turns}], SFT_ROWS, ChatEncoder(_with_template(tok, MARKED), None))
    trained = _trained_ids(marked[0])
    assert contains(trained, thoughts["FINAL"]) and not contains(trained, thoughts["EARLIER"])
    assert contains(trained, tok("a1", add_special_tokens=False)["input_ids"])  # the earlier turn as rendered
    with pytest.raises(DataError, match=r"has reasoning_content but .* does not render it"):
        _encode(tmp_path, [{"messages": turns}], SFT_ROWS, ChatEncoder(tok, None))  # Qwen2.5's template


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"message 0 has role 'assistant' where 'user'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]},
     r"message 1 has role 'user' where 'assistant'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     r"message 1 \(assistant\) is empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, r"the conversation does not end with an assistant turn"),
    ({"messages": [{"role": "robot", "content": "q"}]}, r"message 0 has role 'robot'"),
])
def test_bad_conversations_are_one_line(tmp_path, row, message):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: " + message):
        load_source(str(f), SFT_ROWS)


def test_bad_conversational_pairs_are_one_line(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "chosen": "c", "rejected": "r"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"p.jsonl:1: the prompt must end with a user turn"):
        load_source(str(f), PAIRS)
    f.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "c",
                             "rejected": {"role": "user", "content": "r"}}) + "\n")
    with pytest.raises(DataError, match=r"field 'rejected' must be an assistant message"):
        load_source(str(f), PAIRS)


@pytest.mark.slow
def test_both_stages_train_from_the_cli_on_messages_rows(tmp_path):
    """SFT on multi-turn conversations, then REDI on conversational pairs from its export, one command each."""
    from trainutil import FAST, losses, python_train

    sft, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"
    with open(sft, "w") as f, open(pairs, "w") as g:
        for i in range(16):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}+1?"},
                                             {"role": "assistant", "content": f"{i + 1}"},
                                             {"role": "user", "content": f"{i}+2?"},
                                             {"role": "assistant", "content": f"{i + 2}"}]}) + "\n")
            g.write(json.dumps({"prompt": [{"role": "user", "content": f"{i}+1?"}],
                                "chosen": {"role": "assistant", "content": f"\\boxed{{{i + 1}}}"},
                                "rejected": {"role": "assistant", "content": f"\\boxed{{{i + 3}}}"}}) + "\n")
    out = tmp_path / "run"
    common = [*FAST, "--train.max_steps", "2", "--run.output_dir", str(out)]
    python_train(["--stage", "sft", *common, "--data.path", str(sft)], tmp_path)
    r = python_train(["--stage", "redi", *common, "--data.path", str(pairs), "--model.sft_if_missing", "false"],
                     tmp_path)
    assert len(losses(out / "sft")) == 2 and len(losses(out / "redi")) == 2
    assert "16/16 examples kept" in r.stdout and (out / "redi" / "done").exists()
