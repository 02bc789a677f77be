"""Bad input, reported the same way by every command: a bad row is a `BadRowError(where, reason)` with
`where` = "FILE line N" (JSON lines, 1-based) or "NAME row N" (datasets, the 0-based index that pseudo-paths use
too); a `SkipReport` logs each one, counts them by reason and, with strict=True, turns the first into a fatal error."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass


from colintern.errors import UserError


log = logging.getLogger("colintern.data.datasets")


class BadRowError(UserError):
    """One unusable item (row, line, image); str() is "WHERE: REASON", REASON starting with a short kind."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


@dataclass(frozen=True)
class SkippedRow:
    """An item that was skipped, where it was and why."""

    where: str
    reason: str

    @property
    def kind(self) -> str:
        """The reason's category, e.g. "corrupt image" for "corrupt image: not a recognised image format"."""
        return self.reason.split(":", 1)[0].strip()


class SkipReport:
    """Collects skipped items; logs each as a warning; strict=True raises on the first. Nothing is skipped silently."""

    def __init__(self, strict: bool = False, logger: logging.Logger | None = None) -> None:
        self.strict = strict
        self.items: list[SkippedRow] = []
        self._log = logger or log

    def add(self, where: str, reason: str) -> None:
        """Record a skipped item (or raise BadRowError when strict)."""
        if self.strict:
            raise BadRowError(where, reason)
        self.items.append(SkippedRow(where, reason))
        self._log.warning("skipped %s: %s", where, reason)

    def add_error(self, error: BadRowError) -> None:
        """Record a BadRowError (or re-raise it when strict)."""
        if self.strict:
            raise error
        self.add(error.where, error.reason)

    @property
    def count(self) -> int:
        """Number of skipped items."""
        return len(self.items)

    def counts(self) -> dict[str, int]:
        """Skipped items by reason kind, most frequent first."""
        return dict(Counter(item.kind for item in self.items).most_common())

    def summary(self) -> str:
        """One line: how many items were skipped and why."""
        if not self.items:
            return "skipped 0 items"
        parts = ", ".join(f"{kind} x{n}" for kind, n in self.counts().items())
        return f"skipped {len(self.items)} item{'s' if len(self.items) != 1 else ''}: {parts}"
