"""BabyLM word milestones.

BabyLM asks for checkpoints at 1M…10M words (every 1M), 20M…100M (every 10M) and
200M…1000M (every 100M), counted as total words seen, repeats included, and named
`chck_<N>M` (docs/evaluation.md#checkpoint-names; the reference's callback used the
same 28 points, docs/reference.md#word-counting-and-milestones). Here the count is
the words of the samples actually trained on, added after each optimizer step, and
the tracker's state is saved in every checkpoint, so a resumed run neither repeats
nor skips a milestone (README pitfalls 16-17).
"""
from __future__ import annotations

from typing import Iterable, Sequence

M = 1_000_000

BABYLM_MILESTONES: tuple[int, ...] = (
    tuple(range(1 * M, 10 * M + 1, 1 * M))
    + tuple(range(20 * M, 100 * M + 1, 10 * M))
    + tuple(range(200 * M, 1000 * M + 1, 100 * M))
)


class MilestoneTracker:
    """Reports each milestone once, the first time the word count reaches it."""

    def __init__(self, milestones: Sequence[int] = BABYLM_MILESTONES, done: Iterable[int] = ()):
        self.milestones = tuple(sorted(milestones))
        self.done: set[int] = set(done)

    def update(self, words: int) -> list[int]:
        """Milestones reached by `words` and not reported before (several if one step crossed several)."""
        crossed = [m for m in self.milestones if m <= words and m not in self.done]
        self.done.update(crossed)
        return crossed

    def state(self) -> dict:
        return {"done": sorted(self.done)}
