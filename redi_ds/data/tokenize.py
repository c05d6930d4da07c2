"""Chat-template tokenization with labels on the response tokens only.

A prompt is rendered with the tokenizer's chat template (system prompt configurable) and the generation
prompt; the response is the assistant text followed by the template's end-of-turn text (``<|im_end|>``
for Qwen), which is labelled too, so the model learns to stop. Prompt and response are tokenized
separately and concatenated (the boundary is the generation prompt, as TRL does).

    encoder = ChatEncoder(tokenizer, system_prompt)
    p = encoder.prompt_ids("What is 2+3?")        # [<|im_start|>system ... assistant\\n]
    r = encoder.response_ids("... \\boxed{5}")     # [..., <|im_end|>]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from redi_ds.data.errors import DataError

_PROBE = "\u2063RESPONSE\u2063"


class ChatEncoder:
    def __init__(self, tokenizer, system_prompt: Optional[str] = None):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template (set model.chat_template)")
        full = self._render([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}], False)
        tail = full[full.index(_PROBE) + len(_PROBE):]
        self.end_of_turn = tail.rstrip("\n ")  # e.g. "<|im_end|>"; the trailing newline is not trained

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.system_prompt is not None:
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt_text(self, prompt: str) -> str:
        return self._render([{"role": "user", "content": prompt}], True)

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tok(self.prompt_text(prompt), add_special_tokens=False)["input_ids"]

    def response_ids(self, response: str) -> list[int]:
        return self.tok(response + self.end_of_turn, add_special_tokens=False)["input_ids"]


@dataclass
class SkipReport:
    """Examples dropped by the length limits: counted and reported, never silent."""

    total: int = 0
    kept: int = 0
    reasons: dict = field(default_factory=dict)

    def line(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return f"{self.kept}/{self.total} examples kept; skipped by reason: {why}"


def encode_dataset(ds, kind: str, encoder: ChatEncoder, max_prompt_length: int, max_length: int,
                   num_proc: Optional[int] = None):
    """Tokenize a canonical dataset (see sources.py) and drop examples over the limits.

    sft rows   -> ``prompt_ids``, ``response_ids``
    pairs rows -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
    Returns (dataset, SkipReport).
    """
    responses = ("response",) if kind == "sft" else ("chosen", "rejected")

    def encode(batch):
        out = {"prompt_ids": [encoder.prompt_ids(p) for p in batch["prompt"]], "skip": []}
        for name in responses:
            out[f"{name}_ids"] = [encoder.response_ids(r) for r in batch[name]]
        for i, p in enumerate(out["prompt_ids"]):
            longest = max(len(out[f"{name}_ids"][i]) for name in responses)
            if len(p) > max_prompt_length:
                out["skip"].append("prompt_too_long")
            elif len(p) + longest > max_length:
                out["skip"].append("sequence_too_long")
            else:
                out["skip"].append("")
        return out

    enc = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                 desc="tokenize" if num_proc else None)
    report = SkipReport(total=len(enc))
    for reason in enc["skip"]:
        if reason:
            report.reasons[reason] = report.reasons.get(reason, 0) + 1
    kept = enc.filter(lambda r: r == "", input_columns="skip").remove_columns("skip")
    report.kept = len(kept)
    return kept, report
