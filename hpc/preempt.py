"""Preemption: a signal handler that only sets a flag, and `requested()` that all ranks agree on.

Minimal version written by the training work (the launch work may extend it): USR2 by default, since
NCCL may use USR1. The loop polls `requested()` at step boundaries; when any rank saw the signal, every
rank returns True at the same step, so all save (ZeRO shards live on every rank).
"""

from __future__ import annotations

import signal

_flag = False


def _handler(signum, frame) -> None:
    global _flag
    _flag = True


def install(signals: tuple[int, ...] = (signal.SIGUSR2,)) -> None:
    """Route the given signals to the flag (call once per process, from the main thread)."""
    for sig in signals:
        signal.signal(sig, _handler)


def request() -> None:
    """Set the flag by hand (tests, or a wall-clock budget about to run out)."""
    global _flag
    _flag = True


def clear() -> None:
    global _flag
    _flag = False


def requested() -> bool:
    """True on every rank when any rank has been asked to stop (a collective under torch.distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1.0 if _flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
