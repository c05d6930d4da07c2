"""Chat-template tokenization with labels on the response tokens only.

A prompt is rendered with the tokenizer's chat template (system prompt configurable) and the generation
prompt; the response is the assistant text followed by the template's end-of-turn text (``<|im_end|>``
for Qwen), which is labelled too, so the model learns to stop. Prompt and response are tokenized
separately and concatenated (the boundary is the generation prompt, as TRL does).

    encoder = ChatEncoder(tokenizer, system_prompt)
    p = encoder.prompt_ids("What is 2+3?")        # [<|im_start|>system ... assistant\\n]
    r = encoder.response_ids("... \\boxed{5}")     # [..., <|im_end|>]

What is trained on, and what |y| counts (both losses normalise by these tokens):
- the prompt (system and user turns, and the ``<|im_start|>assistant\\n`` generation prompt) is masked in
  both stages. The official REDI SFT script trains on the prompt too; we do not, as TRL's completion-only
  SFT and OpenRLHF do not: training on the prompt teaches the model to write problems, not to solve them,
  and under a token mean the prompt's tokens would take weight from the response tokens.
- the response ends at the end-of-turn token (``<|im_end|>``), included. The official REDI code also trains
  on the ``\\n<|endoftext|>`` that its chat template and DPO tokenisation put after it. We stop at
  ``<|im_end|>`` because generation stops there (it is the end-of-turn token vLLM and HF ``generate`` stop
  on), so the tokens after it are never sampled. It moves |y| by 2 tokens, under 0.1% of a typical
  2k-19k-token trace.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

from redi_ds.data.errors import DataError
from redi_ds.data.layout import RowLayout

_PROBE = "\u2063RESPONSE\u2063"
ENCODE_VERSION = 1  # part of the cache fingerprint: bump when encode_dataset's output changes
_CHARS_PER_TOKEN = 8  # a prefix of 8 characters per allowed token decides most over-long rows


class ChatEncoder:
    def __init__(self, tokenizer, system_prompt: Optional[str] = None):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template (set model.chat_template)")
        full = self._render([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}], False)
        tail = full[full.index(_PROBE) + len(_PROBE):]
        self.end_of_turn = tail.rstrip("\n ")  # e.g. "<|im_end|>"; the trailing newline is not trained
        self._fingerprint: Optional[str] = None

    def fingerprint(self) -> str:
        """What the encoding depends on: the tokenizer's full spec, the chat template, the system prompt."""
        if self._fingerprint is None:
            backend = getattr(self.tok, "backend_tokenizer", None)
            spec = backend.to_str() if backend is not None else json.dumps(sorted(self.tok.get_vocab().items()))
            extra = json.dumps([self.tok.chat_template, self.system_prompt, self.end_of_turn,
                                sorted(map(str, self.tok.all_special_tokens))])
            self._fingerprint = hashlib.sha256((spec + extra).encode()).hexdigest()
        return self._fingerprint

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if self.system_prompt is not None:
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def prompt_text(self, prompt: str) -> str:
        return self._render([{"role": "user", "content": prompt}], True)

    def prompt_ids(self, prompt: str, limit: Optional[int] = None) -> Optional[list[int]]:
        """Token ids of the rendered prompt; None when there are more than ``limit``."""
        return self._bounded(self.prompt_text(prompt), limit)

    def response_ids(self, response: str, limit: Optional[int] = None) -> Optional[list[int]]:
        """Token ids of the response and its end-of-turn text; None when there are more than ``limit``."""
        return self._bounded(response + self.end_of_turn, limit)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _bounded(self, text: str, limit: Optional[int]) -> Optional[list[int]]:
        """Encode ``text`` unless it has more than ``limit`` tokens, deciding that from a bounded prefix: a
        50 MB row costs the tokenizer a few times ``limit`` characters, not 50 MB. Tokens of a prefix are
        tokens of the whole text except near the cut, so a prefix with more than ``limit`` tokens plus those
        of its last 256 characters (and a margin) proves the whole text too long."""
        if limit is None:
            return self._encode(text)
        cap = limit * _CHARS_PER_TOKEN + 1024
        if len(text) > cap:
            head = text[:cap]
            margin = 64 + len(self._encode(head[-256:]))
            if len(self._encode(head)) > limit + margin:
                return None
        ids = self._encode(text)
        return ids if len(ids) <= limit else None


@dataclass
class SkipReport:
    """Examples dropped by the length limits: counted and reported, never silent."""

    total: int = 0
    kept: int = 0
    reasons: dict = field(default_factory=dict)

    def line(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return f"{self.kept}/{self.total} examples kept; skipped by reason: {why}"


def encode_dataset(ds, layout: RowLayout, encoder: ChatEncoder, max_prompt_length: int, max_length: int,
                   num_proc: Optional[int] = None):
    """Tokenize a canonical dataset (see sources.py) and drop examples over the limits.

    sft rows   -> ``prompt_ids``, ``response_ids``
    pairs rows -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
    and ``num_targets``: the example's response tokens (chosen + rejected for pairs), the tokens its loss
    terms count. Returns (dataset, SkipReport).
    """
    responses = layout.responses

    def encode(batch):
        out: dict = {"prompt_ids": [], **{f"{n}_ids": [] for n in responses}, "num_targets": [], "skip": []}
        for i, prompt in enumerate(batch["prompt"]):
            p = encoder.prompt_ids(prompt, limit=max_prompt_length)
            rs = [] if p is None else [encoder.response_ids(batch[n][i], limit=max_length - len(p))
                                       for n in responses]
            reason = "prompt_too_long" if p is None else "sequence_too_long" if None in rs else ""
            out["skip"].append(reason)
            out["prompt_ids"].append([] if reason else p)
            for n, r in zip(responses, rs if not reason else [[] for _ in responses]):
                out[f"{n}_ids"].append(r)
            out["num_targets"].append(0 if reason else sum(len(r) for r in rs))  # targets: response tokens
        return out

    # an explicit fingerprint: datasets would otherwise hash ``encode`` by pickling its closure, tokenizer
    # included (10 s for Qwen's 151k vocabulary, on every run: measured)
    key = json.dumps([ENCODE_VERSION, getattr(ds, "_fingerprint", ""), layout.name, max_prompt_length, max_length,
                      encoder.fingerprint()])
    enc = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc,
                 desc="tokenize" if num_proc else None,
                 new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])
    report = SkipReport(total=len(enc))
    for reason in enc["skip"]:
        if reason:
            report.reasons[reason] = report.reasons.get(reason, 0) + 1
    kept = enc.filter(lambda r: r == "", input_columns="skip").remove_columns("skip")
    report.kept = len(kept)
    return kept, report
