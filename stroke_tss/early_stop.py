"""Early stopping on a validation quantity, with min/max epochs and a state that checkpoints carry."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(kw_only=True)
class EarlyStopping:
    patience: int
    min_epochs: int = 1
    max_epochs: int = 100
    mode: str = "min"  # "min" for a loss, "max" for an AUC
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float | None, epoch: int) -> bool:
        """Record epoch ``epoch``'s value; True when it is the best so far. NaN/None never improves."""
        if value is None or math.isnan(value):
            improved = False
        elif self.best is None:
            improved = True
        else:
            delta = (self.best - value) if self.mode == "min" else (value - self.best)
            improved = delta > self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def should_stop(self, epoch: int) -> bool:
        """After epoch ``epoch`` (0-based) has been recorded."""
        done = epoch + 1
        if done >= self.max_epochs:
            return True
        return done >= self.min_epochs and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ("best", "best_epoch", "bad_epochs"):
            setattr(self, key, state[key])
