"""Named stages with a time budget each: what a long end-to-end command (the demo) prints as it goes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class StageTimer:
    """Runs stages in order, prints each one's budget before and its time after, keeps a summary."""

    total_budget_s: float
    records: list[dict] = field(default_factory=list)
    _start: float = field(default_factory=time.perf_counter)

    def run(self, name: str, budget_s: float, fn: Callable[[], Any]) -> Any:
        done = len(self.records)
        log.info("[stage %d] %s: budget %s", done + 1, name, _fmt(budget_s))
        start = time.perf_counter()
        result = fn()
        took = time.perf_counter() - start
        over = took > budget_s
        self.records.append({"stage": name, "seconds": round(took, 1), "budget_s": budget_s, "over": over})
        log.log(logging.WARNING if over else logging.INFO, "[stage %d] %s: done in %s%s", done + 1, name,
                _fmt(took), f" (over its {_fmt(budget_s)} budget)" if over else "")
        return result

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._start

    def summary(self) -> str:
        lines = [f"{'stage':<22} {'time':>8} {'budget':>8}"]
        lines += [f"{r['stage']:<22} {_fmt(r['seconds']):>8} {_fmt(r['budget_s']):>8}{'  over' if r['over'] else ''}"
                  for r in self.records]
        lines.append(f"{'total':<22} {_fmt(self.elapsed_s):>8} {_fmt(self.total_budget_s):>8}")
        return "\n".join(lines)


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
