"""The data of one stage: its rows from ``data.path``, tokenized with the run's template and limits.

    encode = stage_encoder(cfg, tokenizer)        # (raw, layout) -> (dataset, SkipReport): data and held-out pairs
    data, lengths = load_stage_data(cfg, layout, tokenizer)
    steps = count_steps(cfg, len(data))
"""

from __future__ import annotations

import torch

from redi_ds.data.errors import DataError
from redi_ds.data.layout import RowLayout
from redi_ds.ranks import log0


def stage_encoder(cfg, tokenizer):
    """``encode(raw, layout) -> (dataset, SkipReport)``: the chat template, system prompt and length limits of
    this run (what the training data and the held-out pairs are both tokenized with)."""
    from redi_ds.data.tokenize import ChatEncoder, encode_dataset

    chat = ChatEncoder(tokenizer, cfg.data.system_prompt, cfg.data.train_on)
    return lambda raw, layout: encode_dataset(raw, layout, chat, cfg.data.max_prompt_length, cfg.data.max_length)


def load_stage_data(cfg, layout: RowLayout, tokenizer):
    """Encoded rows (over-long ones skipped and counted) and their response-token counts [N]."""
    from redi_ds.data.sources import load_source

    raw = load_source(cfg.data.path, layout, cfg.data.split, synthetic_size=cfg.data.synthetic_size,
                      seed=cfg.run.seed, data_format=cfg.data.format)
    if cfg.data.limit > 0:
        raw = raw.select(range(min(cfg.data.limit, len(raw))))
    data, skipped = stage_encoder(cfg, tokenizer)(raw, layout)
    log0(f"data {cfg.data.path} ({layout}): {skipped.line()}")
    if len(data) < cfg.train.global_batch_size:
        raise DataError(f"{cfg.data.path}: {len(data)} usable examples < train.global_batch_size "
                        f"({cfg.train.global_batch_size}); {skipped.line()}")
    return data, torch.tensor(data["num_targets"], dtype=torch.long)


def count_steps(cfg, n: int) -> int:
    total = cfg.train.epochs * (n // cfg.train.global_batch_size)
    if cfg.train.max_steps > 0:
        total = min(total, cfg.train.max_steps) if cfg.train.epochs > 0 else cfg.train.max_steps
    return total
