"""Engine checkpoints: one folder of tags, each a complete snapshot that training resumes from.

    ckpts = Checkpoints(out / "ckpt", keep=3)
    state = ckpts.load(engine)                  # every rank; None on a fresh start
    ...
    ckpts.save(engine, tag=f"step-{n}", state={"step": n})   # every rank

On disk (old run folders must keep resuming, so this layout is fixed):

    FOLDER/latest                 name of the newest complete tag
    FOLDER/TAG/done               JSON {"world_size", "engine"}; written last, so a tag without it is incomplete
    FOLDER/TAG/rank-00000.pt      {"rng": rng_state()} of each rank
    FOLDER/TAG/state.pt           {"model", "optimizer", "client": state} (local and DDP engines; rank 0 writes)
    FOLDER/TAG/...                DeepSpeed's own sharded format, with client_state {"client": state}

The engine writes and reads its own format (`Engine.save_states` / `load_states`); this module owns the
rest: tags, the ``done`` marker, ``latest``, pruning and the per-rank RNG states.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from hpc.engine import Engine

log = logging.getLogger(__name__)

_LATEST = "latest"
_DONE = "done"


def rng_state() -> dict:
    """Every RNG a training loop touches, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """The checkpoint folder of one training run.

    ``keep`` prunes older complete tags after each save, keeping the newest ``keep``; tags named
    ``best*`` are never pruned.
    """

    def __init__(self, folder: str | Path, *, keep: int | None = None):
        self.folder = Path(folder)
        self.keep = keep

    def tags(self) -> list[str]:
        """Complete tags, oldest first (a tag is complete once its ``done`` marker exists)."""
        if not self.folder.is_dir():
            return []
        done = [p / _DONE for p in self.folder.iterdir() if (p / _DONE).is_file()]
        return [d.parent.name for d in sorted(done, key=lambda d: d.stat().st_mtime_ns)]

    def latest(self) -> str | None:
        """The newest complete tag, or None."""
        marker = self.folder / _LATEST
        if marker.is_file():
            tag = marker.read_text().strip()
            if (self.folder / tag / _DONE).is_file():
                return tag
        tags = self.tags()  # `latest` is written after `done`: a crash between the two leaves it stale
        return tags[-1] if tags else None

    def save(self, engine: Engine, *, tag: str, state: dict) -> Path:
        """Write tag ``tag``: model, optimizer, ``state`` (rank 0's) and every rank's RNG states.

        Collective: every rank calls it (ZeRO shards live on every rank).
        """
        path = self.folder / tag
        if engine.is_main:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        engine.barrier()
        engine.save_states(path, state)
        torch.save({"rng": rng_state()}, path / _rank_file(engine.rank))
        engine.barrier()
        if engine.is_main:
            (path / _DONE).write_text(json.dumps({"world_size": engine.world_size, "engine": engine.kind}))
            (self.folder / _LATEST).write_text(tag)
            self._prune(keep_also=tag)
        engine.barrier()
        return path

    def load(self, engine: Engine, *, tag: str | None = None) -> dict | None:
        """Restore the newest (or the named) tag into ``engine`` and this rank's RNGs; returns the saved
        ``state``, or None when the folder holds no complete checkpoint. Collective."""
        if tag is None:
            tag = self.latest()
            if tag is None:
                return None
        path = self.folder / tag
        if not (path / _DONE).is_file():
            raise ValueError(f"checkpoint {path} is incomplete (no 'done' marker); delete it or name another tag")
        meta = json.loads((path / _DONE).read_text())
        if meta.get("engine") != engine.kind:
            raise ValueError(f"checkpoint {path} was written by the {meta.get('engine')} engine, not {engine.kind}; "
                             "resume with the same engine or start from weights.pt")
        state = engine.load_states(path)
        rank_file = path / _rank_file(engine.rank)
        rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else {}
        if "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        else:
            # A new rank after a change of world size: its RNGs continue from this run's seeding.
            log.warning("checkpoint %s holds no RNG states for rank %d (saved with %s ranks); keeping the current "
                        "ones", path, engine.rank, meta.get("world_size"))
        return state

    def _prune(self, *, keep_also: str) -> None:
        if self.keep is None:
            return
        rolling = [t for t in self.tags() if not t.startswith("best")]
        for old in rolling[:-self.keep] if self.keep > 0 else rolling:
            if old != keep_also:
                shutil.rmtree(self.folder / old, ignore_errors=True)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"
