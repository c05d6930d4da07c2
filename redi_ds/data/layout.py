"""What one training example is: an SFT row or a preference pair. Decided once, by the loss (``paired``).

    SFT_ROWS  prompt + response             1 sequence per example
    PAIRS     prompt + chosen + rejected    2 sequences per example; a batch of B examples holds the B chosen
                                            sequences first, then the B rejected ones (chosen_1..B, rejected_1..B)

Every place that needs the layout (sources, tokenization, collation, the no-gradient passes, the prepared
folder's sub-folder) asks this object, never a string.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    name: str                    # the prepared folder's sub-folder: "sft" or "pairs"
    responses: tuple[str, ...]   # the response fields, in sequence order within a batch

    @property
    def fields(self) -> tuple[str, ...]:
        """The canonical columns of a source (sources.load_source)."""
        return ("prompt",) + self.responses

    @property
    def sequences_per_example(self) -> int:
        return len(self.responses)

    def sequence_index(self, rows: list[int], n: int) -> torch.Tensor:
        """Where the sequences of examples ``rows`` (in batch order) sit in a dataset-wide [n x sequences]
        vector laid out response by response: [response_0 of all n, response_1 of all n, ...]."""
        t = torch.tensor(rows, dtype=torch.long)
        return torch.cat([t + k * n for k in range(self.sequences_per_example)])

    def __str__(self) -> str:
        return self.name


SFT_ROWS = RowLayout("sft", ("response",))
PAIRS = RowLayout("pairs", ("chosen", "rejected"))


def layout_for(paired: bool) -> RowLayout:
    return PAIRS if paired else SFT_ROWS
