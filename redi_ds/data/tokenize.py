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
import re
from dataclasses import dataclass, field
from typing import Optional

from redi_ds.data.errors import DataError
from redi_ds.data.layout import RowLayout

_PROBE = "\u2063RESPONSE\u2063"
ENCODE_VERSION = 2  # part of the cache fingerprint: bump when encode_dataset's output changes
TRAIN_ON = ("all", "last_turn")  # data.train_on: which assistant turns of an SFT conversation are trained
_CHARS_PER_TOKEN = 8  # a prefix of 8 characters per allowed token decides most over-long rows


class ChatEncoder:
    def __init__(self, tokenizer, system_prompt: Optional[str] = None, train_on: str = "all"):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        if train_on not in TRAIN_ON:
            raise DataError(f"data.train_on = {train_on!r}; expected one of {', '.join(TRAIN_ON)}")
        self.train_on = train_on
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise DataError("the tokenizer has no chat template (set model.chat_template)")
        full = self._render([{"role": "user", "content": "x"}, {"role": "assistant", "content": _PROBE}], False)
        tail = full[full.index(_PROBE) + len(_PROBE):]
        self.end_of_turn = tail.rstrip("\n ")  # e.g. "<|im_end|>"; the trailing newline is not trained
        # the template marks the assistant's tokens itself ({% generation %}): its masks are used as they are
        self.markers = isinstance(template, str) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        last = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": _PROBE}]
        self.renders_reasoning = _PROBE in self._render(last, False)
        self.template_name = getattr(tokenizer, "name_or_path", "") or "the chat template"
        self._fingerprint: Optional[str] = None

    def fingerprint(self) -> str:
        """What the encoding depends on: the tokenizer's full spec, the chat template, the system prompt."""
        if self._fingerprint is None:
            backend = getattr(self.tok, "backend_tokenizer", None)
            spec = backend.to_str() if backend is not None else json.dumps(sorted(self.tok.get_vocab().items()))
            extra = json.dumps([self.tok.chat_template, self.system_prompt, self.end_of_turn, self.train_on,
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

    # -- conversations (redi_ds.data.conversation): the template decides what is an assistant turn
    def _with_system(self, messages: list[dict]) -> list[dict]:
        """The conversation's own system turn wins; data.system_prompt is added to a conversation without one."""
        if self.system_prompt is None or (messages and messages[0]["role"] == "system"):
            return messages
        return [{"role": "system", "content": self.system_prompt}] + messages

    def _chat(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _check_reasoning(self, messages: list[dict]) -> None:
        if not self.renders_reasoning and any(m.get("reasoning_content") for m in messages):
            raise DataError(f"a message has reasoning_content but {self.template_name}'s chat template does not render "
                            "it (not even for the last assistant turn): it would never be trained; put the reasoning "
                            "in content (e.g. <think>...</think>) or use a template that renders reasoning_content")

    def conversation_segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, trained) segments, up to its last trained token. Without generation
        markers, assistant turn k spans from the end of render(turns < k, generation prompt) to the end of
        render(turns <= k) (its end-of-turn text included, the newline after it not): both must be prefixes of
        the whole conversation's rendering, or the spans cannot be found (one-line error)."""
        msgs = self._with_system(messages)
        self._check_reasoning(msgs)
        full = self._chat(msgs, False)
        turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        if self.train_on == "last_turn":
            turns = turns[-1:]
        segments, pos = [], 0
        for k in turns:
            head, upto = self._chat(msgs[:k], True), self._chat(msgs[: k + 1], False)
            if not (full.startswith(head) and upto.startswith(head)):
                raise DataError(f"{self.template_name}'s chat template does not render a conversation as the prefix "
                                "of its continuation, so its assistant spans cannot be found; add {% generation %} "
                                "markers to the template")
            if not full.startswith(upto):
                raise DataError(f"{self.template_name}'s chat template renders an earlier assistant turn differently "
                                "once later turns follow (it drops its reasoning, say), so that turn's span cannot be "
                                "found by diffing; set data.train_on: last_turn, or add {% generation %} markers")
            end = len(upto.rstrip("\n "))
            segments += [(full[pos:len(head)], False), (full[len(head):end], True)]
            pos = end
        return segments

    def conversation_ids(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """(token ids, trained flags) of an SFT conversation, ending at its last trained token."""
        if not self.markers:
            ids, flags = [], []
            for text, trained in self.conversation_segments(messages):
                seg = self._encode(text)  # each segment on its own: the boundaries are the template's
                ids += seg
                flags += [trained] * len(seg)
            return ids, flags
        msgs = self._with_system(messages)
        self._check_reasoning(msgs)
        out = self.tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(x) for x in out["assistant_masks"]]
        if self.train_on == "last_turn":
            last = max((i for i, f in enumerate(mask) if f), default=-1)
            start = last
            while start > 0 and mask[start - 1]:
                start -= 1
            mask = [start <= i <= last for i in range(len(mask))]
        end = max((i for i, f in enumerate(mask) if f), default=-1) + 1
        return ids[:end], mask[:end]

    def pair_ids(self, prompt: list[dict], response: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) of the final assistant turn after a conversational prompt: the same
        boundary as a plain row (the generation prompt), so a plain pair and its messages form encode alike."""
        msgs = self._with_system(prompt)
        self._check_reasoning(msgs + [response])
        head, upto = self._chat(msgs, True), self._chat(msgs + [response], False)
        if not upto.startswith(head):
            raise DataError(f"{self.template_name}'s chat template does not render the prompt as the prefix of the "
                            "prompt and its answer; the response cannot be found")
        return self._encode(head), self._encode(upto[len(head):].rstrip("\n "))

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


def _spans(flags: list[bool]) -> list[list[int]]:
    """[start, end) runs of True."""
    out, start = [], None
    for i, f in enumerate(flags + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append([start, i])
            start = None
    return out


class _PlainRows:
    """Rows of strings: the prompt as one user turn, each response as the assistant's answer."""

    def __init__(self, layout: RowLayout, encoder: ChatEncoder, max_prompt: int, max_length: int):
        self.layout, self.enc, self.max_prompt, self.max_length = layout, encoder, max_prompt, max_length

    def encode(self, batch: dict, i: int) -> tuple[str, Optional[list[int]], list[Optional[list[int]]]]:
        p = self.enc.prompt_ids(batch["prompt"][i], limit=self.max_prompt)
        if p is None:
            return "prompt_too_long", None, []
        rs = [self.enc.response_ids(batch[n][i], limit=self.max_length - len(p)) for n in self.layout.responses]
        return ("sequence_too_long" if None in rs else ""), p, rs


class _ConversationRows(_PlainRows):
    """Rows of a ``conversation`` (redi_ds.data.conversation): SFT conversations (every assistant turn, or the
    last, with its spans from the template), or pairs whose responses are the final assistant turn."""

    def encode(self, batch: dict, i: int):
        conv = json.loads(batch["conversation"][i])
        if self.layout.sequences_per_example == 1:
            ids, flags = self.enc.conversation_ids(conv["messages"])
            first = flags.index(True) if True in flags else len(flags)
            if first > self.max_prompt:
                return "prompt_too_long", None, []
            if len(ids) > self.max_length:
                return "sequence_too_long", None, []
            return "", ids[:first], [(ids[first:], _spans(flags[first:]))]
        p, rs = None, []
        for name in self.layout.responses:
            p, r = self.enc.pair_ids(conv["prompt"], conv[name])
            rs.append(r)
        if len(p) > self.max_prompt:
            return "prompt_too_long", None, []
        return ("sequence_too_long" if any(len(p) + len(r) > self.max_length for r in rs) else ""), p, rs


def encode_dataset(ds, layout: RowLayout, encoder: ChatEncoder, max_prompt_length: int, max_length: int,
                   num_proc: Optional[int] = None):
    """Tokenize a canonical dataset (see sources.py) and drop examples over the limits.

    sft rows   -> ``prompt_ids``, ``response_ids``, ``response_spans`` ([start, end) runs of ``response_ids`` that
                  are trained: the whole response for a plain row, each assistant turn of a conversation)
    pairs rows -> ``prompt_ids``, ``chosen_ids``, ``rejected_ids``
    and ``num_targets``: the example's trained tokens (chosen + rejected for pairs), the tokens its loss terms
    count. Returns (dataset, SkipReport).
    """
    rows_cls = _ConversationRows if "conversation" in ds.column_names else _PlainRows
    rows = rows_cls(layout, encoder, max_prompt_length, max_length)
    responses = layout.responses
    sft = layout.sequences_per_example == 1

    def encode(batch):
        out: dict = {"prompt_ids": [], **{f"{n}_ids": [] for n in responses}, "num_targets": [], "skip": []}
        if sft:
            out["response_spans"] = []
        for i in range(len(batch[ds.column_names[0]])):
            reason, p, rs = rows.encode(batch, i)
            if reason:
                p, rs = [], [[] for _ in responses]
            if sft:
                r, spans = rs[0] if isinstance(rs[0], tuple) else (rs[0], [[0, len(rs[0])]] if rs[0] else [])
                rs = [r]
                out["response_spans"].append(spans)
                targets = sum(e - s for s, e in spans)
            else:
                targets = sum(len(r) for r in rs)  # targets: response tokens
            out["skip"].append(reason)
            out["prompt_ids"].append(p)
            for n, r in zip(responses, rs):
                out[f"{n}_ids"].append(r)
            out["num_targets"].append(0 if reason else targets)
        return out

    # an explicit fingerprint: datasets would otherwise hash ``encode`` by pickling its closure, tokenizer
    # included (10 s for Qwen's 151k vocabulary, on every run: measured)
    key = json.dumps([ENCODE_VERSION, getattr(ds, "_fingerprint", ""), layout.name, max_prompt_length, max_length,
                      encoder.fingerprint(), rows_cls.__name__])
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
