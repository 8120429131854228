"""The result of scoring: one importance value per block, and how it was computed (saved as scores.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ShortenedError


@dataclass
class BlockScores:
    """One importance score per block (lower = less important) and how they were computed."""

    criterion: str
    #: ``scores[i]`` for original block ``i``; None for blocks skipped as already removed.
    scores: list[float | None]
    settings: dict[str, Any] = field(default_factory=dict)
    #: For ``angular``: ``span_scores[n - 1][l]`` = distance when removing blocks ``l .. l+n-1``.
    span_scores: list[list[float]] | None = None
    #: Extra figures (e.g. the mean NLL per removal for ``ppl``).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.scores)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"criterion": self.criterion, "num_blocks": self.num_blocks,
                             "scores": list(self.scores), "settings": dict(self.settings)}
        if self.span_scores is not None:
            d["span_scores"] = self.span_scores
        if self.extra:
            d["extra"] = self.extra
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BlockScores":
        try:
            if not isinstance(d["scores"], list):
                raise TypeError
            scores = [None if s is None else float(s) for s in d["scores"]]
            criterion = str(d["criterion"])
            settings, extra = dict(d.get("settings", {})), dict(d.get("extra", {}))
        except (KeyError, TypeError, ValueError):
            raise ShortenedError("not a scores file: expected 'criterion', a list of numeric 'scores' and "
                                 "objects for 'settings' and 'extra'") from None
        return cls(criterion=criterion, scores=scores, settings=settings, span_scores=d.get("span_scores"),
                   extra=extra)
