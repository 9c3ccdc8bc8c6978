"""Config problems are collected, never raised one at a time: a user fixes them all in one edit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

_UNSET = object()


@dataclass(frozen=True)
class ConfigIssue:
    key: str
    message: str
    fix: str
    value: Any = _UNSET
    file: Optional[str] = None

    def format(self) -> str:
        where = f"{self.file}: " if self.file else ""
        shown = "" if self.value is _UNSET else f" = {self.value!r}"
        return f"{where}{self.key}{shown}: {self.message}\n    fix: {self.fix}"


class ConfigError(Exception):
    """Raised with every problem found; `deepy.py` prints them and exits 2 before anything launches."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__(self.format())

    def keys(self) -> list[str]:
        return [issue.key for issue in self.issues]

    def format(self, outcome: str = "nothing was launched") -> str:
        n = len(self.issues)
        head = f"Config error{'s' if n != 1 else ''} ({n}); {outcome}:"
        return "\n".join([head] + [f"  - {issue.format()}" for issue in self.issues])
