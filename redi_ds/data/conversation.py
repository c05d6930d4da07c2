"""Conversational rows: chat ``messages`` (TRL, OpenRLHF, LLaMA-Factory, open-r1 all read this layout).

    SFT    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", "content": ...,
                         "reasoning_content": ...?}, {"role": "user", ...}, {"role": "assistant", ...}]}
    pairs  {"prompt": [messages ending with a user turn], "chosen": {"role": "assistant", "content": ...} or a
            string, "rejected": the same}

A row is checked here (one line naming the file, the line and the field): roles in order (an optional system turn
first, then user and assistant alternating from a user turn), no empty assistant turn, an SFT conversation that ends
with an assistant turn, a pair prompt that ends with a user turn. The canonical form the rest of the data pipeline
carries is one JSON string per row (column ``conversation``), so that Arrow never has to unify message schemas.

Which system prompt: the conversation's own system turn wins; ``data.system_prompt`` is added only to a
conversation that has none (and to every plain row, as before).
"""

from __future__ import annotations

import json
from typing import Callable

from redi_ds.data.errors import DataError

ROLES = ("system", "user", "assistant")
COLUMN = "conversation"


def _message(m, where: str, i: int) -> dict:
    if isinstance(m, str):  # a bare string as chosen / rejected: the assistant's content
        m = {"role": "assistant", "content": m}
    if not isinstance(m, dict):
        raise DataError(f"{where}: message {i} must be an object with role and content, got {type(m).__name__}")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
    reasoning = m.get("reasoning_content")
    if content is None:
        content = ""
    if not isinstance(content, str) or (reasoning is not None and not isinstance(reasoning, str)):
        raise DataError(f"{where}: message {i} ({role}): content and reasoning_content must be strings")
    if not content.strip() and not (reasoning or "").strip():
        raise DataError(f"{where}: message {i} ({role}) is empty")
    out = {"role": role, "content": content}
    if reasoning:
        out["reasoning_content"] = reasoning
    return out


def check_order(messages: list[dict], where: str) -> None:
    """An optional system turn first, then user / assistant alternating from a user turn."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            n = i + len(messages) - len(body)
            raise DataError(f"{where}: message {n} has role {m['role']!r} where {expected!r} was expected (roles "
                            "out of order: an optional system turn, then user and assistant alternating)")


def sft_conversation(row: dict, where: Callable[[str], str]) -> dict:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where('messages')}: field 'messages' must be a non-empty list of messages")
    msgs = [_message(m, where("messages"), i) for i, m in enumerate(messages)]
    check_order(msgs, where("messages"))
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where('messages')}: the conversation does not end with an assistant turn (nothing to "
                        "train on after its last turn)")
    return {COLUMN: json.dumps({"messages": msgs}, ensure_ascii=False)}


def pair_conversation(row: dict, where: Callable[[str], str]) -> dict:
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where('prompt')}: field 'prompt' must be messages (a list) or a string")
    msgs = [_message(m, where("prompt"), i) for i, m in enumerate(prompt)]
    check_order(msgs, where("prompt"))
    if msgs[-1]["role"] != "user":
        raise DataError(f"{where('prompt')}: the prompt must end with a user turn")
    out = {"prompt": msgs}
    for name in ("chosen", "rejected"):
        value = row.get(name)
        if isinstance(value, list):
            if len(value) != 1:
                raise DataError(f"{where(name)}: field {name!r} must be one assistant message, got {len(value)}")
            value = value[0]
        if value is None:
            raise DataError(f"{where(name)}: missing field {name!r}")
        m = _message(value, where(name), 0)
        if m["role"] != "assistant":
            raise DataError(f"{where(name)}: field {name!r} must be an assistant message, got role {m['role']!r}")
        out[name] = m
    return {COLUMN: json.dumps(out, ensure_ascii=False)}


def is_conversational(row: dict, paired: bool) -> bool:
    """Whether a row is in the messages layout (``data.format: auto``)."""
    return isinstance(row.get("prompt"), list) if paired else "messages" in row
