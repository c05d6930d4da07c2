"""Collation: padded rows or one padding-free packed row, with the targets already shifted.

A batch holds S sequences (SFT: the B rows; pairs: chosen_1..chosen_B then rejected_1..rejected_B) and:

    input_ids    [R, T]   R = S (padded, right padding) or 1 (padding-free: all sequences in one row)
    position_ids [R, T]   restarting at 0 for every sequence
    attention_mask [R, T] padded mode only (None when packed: the model sees sequence starts in position_ids)
    targets      [R, T]   targets[t] = input_ids[t + 1] where that token is a response token, else -100
    seq_ids      [R, T]   packed mode: the sequence index of each position (None when padded: row = sequence)
    num_seqs     S
    counts       [S]      target tokens per sequence (its response tokens, end-of-turn included)
    span_mask    [R, T]   targets in the divergent span: every chosen (and SFT) target; a rejected response's
                          targets from its first token that departs from the chosen one (loss.negative_span)
    span_counts  [S]      targets in that span per sequence

so the head computes log p(targets[t] | prefix up to t) at every position t, and per-sequence sums are
over non-ignored targets: exactly the response tokens (end-of-turn included).
"""

from __future__ import annotations

from typing import Optional

import torch

from redi_ds.data.layout import SFT_ROWS, RowLayout
from redi_ds.kernels.reference import IGNORE_INDEX


def _trained(prompt_len: int, response_len: int, spans=None) -> list[bool]:
    """Per token: is it trained? The response's ``spans`` ([start, end) runs) or, without them, all of it."""
    flags = [False] * prompt_len + ([True] * response_len if spans is None else [False] * response_len)
    for s, e in spans or ():
        flags[prompt_len + s:prompt_len + e] = [True] * (e - s)
    return flags


def sequences(examples: list[dict], layout: RowLayout) -> list[tuple[list[int], list[bool], int]]:
    """(token ids, trained flags, span start) per sequence, in the order the losses expect. The span start is
    the response index where the sequence's divergent span begins: 0, except for a rejected response, where it
    is the length of the prefix it shares with the chosen one (its first token that departs from it)."""
    if layout == SFT_ROWS:
        return [(e["prompt_ids"] + e["response_ids"],
                 _trained(len(e["prompt_ids"]), len(e["response_ids"]), e.get("response_spans")), 0)
                for e in examples]
    chosen = [(e["prompt_ids"] + e["chosen_ids"], _trained(len(e["prompt_ids"]), len(e["chosen_ids"])), 0)
              for e in examples]
    rejected = [(e["prompt_ids"] + e["rejected_ids"], _trained(len(e["prompt_ids"]), len(e["rejected_ids"])),
                 common_prefix(e["chosen_ids"], e["rejected_ids"])) for e in examples]
    return chosen + rejected


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _shifted_targets(ids: list[int], trained: list[bool]) -> list[int]:
    # position t predicts ids[t+1]; only trained tokens (the assistant's) are targets
    return [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def _span_flags(ids: list[int], trained: list[bool], start: int) -> list[bool]:
    # position t's target is response token t + 1 - first trained token: in the span from index `start` on
    first = trained.index(True) if True in trained else len(trained)
    return [t + 1 - first >= start for t in range(len(ids) - 1)] + [False]


def collate(examples: list[dict], layout: RowLayout, pad_id: int, padding_free: bool = False) -> dict:
    return collate_sequences(sequences(examples, layout), pad_id, padding_free)


def _shifted_values(values: list[float], trained: list[bool]) -> list[float]:
    # position t predicts token t + 1: it carries that token's value (0 where the token is not trained)
    return [values[t + 1] if trained[t + 1] else 0.0 for t in range(len(values) - 1)] + [0.0]


def collate_sequences(seqs: list[tuple[list[int], list[bool], int]], pad_id: int, padding_free: bool = False,
                      values: Optional[list[list[float]]] = None) -> dict:
    """The batch of ``(token ids, trained flags, span start)`` sequences (see the module doc). ``values``: a number
    per token of each sequence, laid out like the targets as ``token_values`` [R, T] float64 (the per-token
    coefficients of on-policy distillation)."""
    if padding_free:
        ids = [t for s, _, _ in seqs for t in s]
        pos = [i for s, _, _ in seqs for i in range(len(s))]
        tgt = [t for s, m, _ in seqs for t in _shifted_targets(s, m)]
        span = [f for s, m, d in seqs for f in _span_flags(s, m, d)]
        sid = [k for k, (s, _, _) in enumerate(seqs) for _ in s]
        as_row = lambda x, dt=torch.long: torch.tensor([x], dtype=dt)  # noqa: E731
        batch = {"input_ids": as_row(ids), "position_ids": as_row(pos), "attention_mask": None,
                 "targets": as_row(tgt), "seq_ids": as_row(sid), "num_seqs": len(seqs)}
        if values is not None:
            batch["token_values"] = as_row([x for (_, m, _), v in zip(seqs, values) for x in _shifted_values(v, m)],
                                           torch.float64)
        return _with_counts(batch, as_row(span, torch.bool))
    width = max(len(s) for s, _, _ in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    span = torch.zeros((n, width), dtype=torch.bool)
    token_values = torch.zeros((n, width), dtype=torch.float64) if values is not None else None
    for i, (s, m, d) in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        targets[i, : len(s)] = torch.tensor(_shifted_targets(s, m))
        span[i, : len(s)] = torch.tensor(_span_flags(s, m, d))
        mask[i, : len(s)] = 1
        if token_values is not None:
            token_values[i, : len(s)] = torch.tensor(_shifted_values(values[i], m), dtype=torch.float64)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask,
             "targets": targets, "seq_ids": None, "num_seqs": n}
    if token_values is not None:
        batch["token_values"] = token_values
    return _with_counts(batch, span)


def _with_counts(batch: dict, span: torch.Tensor) -> dict:
    """Add counts [S], and the divergent span: span_mask (targets in it) and span_counts [S]."""
    span = span & (batch["targets"] != IGNORE_INDEX)
    return batch | {"counts": token_counts(batch), "span_mask": span, "span_counts": _per_sequence(batch, span)}


def token_counts(batch: dict) -> torch.Tensor:
    """Target tokens per sequence [S], known before the forward pass."""
    return _per_sequence(batch, batch["targets"] != IGNORE_INDEX)


def _per_sequence(batch: dict, flags: torch.Tensor) -> torch.Tensor:
    if batch["seq_ids"] is None:
        return flags.sum(-1)
    return torch.zeros(batch["num_seqs"], dtype=torch.long).index_add(
        0, batch["seq_ids"].reshape(-1), flags.reshape(-1).long())


def per_position(batch: dict, values: torch.Tensor) -> torch.Tensor:
    """A per-sequence tensor [S] spread over the positions of the batch (the targets' shape)."""
    if batch["seq_ids"] is None:
        return values[:, None].expand(batch["targets"].shape)
    return values.index_select(0, batch["seq_ids"].reshape(-1).to(values.device)).view(batch["targets"].shape)
