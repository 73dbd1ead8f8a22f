"""Engine checkpoints: one folder of tags, each a complete snapshot that training resumes from.

    ckpts = Checkpoints(out / "ckpt", keep=3)
    state = ckpts.load(engine)                  # every rank; None on a fresh start
    ...
    ckpts.save(engine, tag=f"step-{n}", state={"step": n})   # every rank

On disk (old run folders must keep resuming, so this layout is fixed):

    FOLDER/latest                 name of the newest complete tag
    FOLDER/TAG/done               JSON {"world_size", "engine"}; written last, so a tag without it is incomplete
    FOLDER/TAG/digests.json       {"sha256": {file: hex}} of every file of the tag, written just before ``done``
    FOLDER/TAG/rank-00000.pt      {"rng": rng_state()} of each rank
    FOLDER/TAG/state.pt           {"model", "optimizer", "client": state} (local and DDP engines; rank 0 writes)
    FOLDER/TAG/...                DeepSpeed's own sharded format, with client_state {"client": state}

The engine writes and reads its own format (`Engine.save_states` / `load_states`); this module owns the
rest: tags, the ``done`` marker, digests, ``latest``, pruning and the per-rank RNG states.

Nothing is trusted as it lies on disk: every file is read with `safe_load` (tensors and plain containers only;
a pickled object that could run code is refused), and `load` verifies a tag's digests before it reads a byte
of it. A damaged latest tag falls back to the newest intact one, with a warning naming both. Tags saved before
digests existed still load, with a warning that they cannot be verified. `save_file` / `load_file` do the same
for a lone file (its digest beside it, FILE.sha256).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hpc.errors import CheckpointError

if TYPE_CHECKING:
    from hpc.engine import Engine

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "Checkpoints", "file_digest", "load_file", "rng_state", "safe_load", "save_file",
           "set_rng_state", "state_digest"]

_LATEST = "latest"
_DONE = "done"
_DIGESTS = "digests.json"
_CHUNK = 1 << 20


def safe_load(path: str | Path, *, map_location: Any = None, allow: Sequence[type] = (),
              fix: str = "replace the file") -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers, plus the classes in ``allow``. Anything
    else, and a missing, empty, truncated or foreign file, is a one-line `CheckpointError` ending in ``fix``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; {fix}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (a save cut short?); {fix}")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or its legacy pickle stream
        raise CheckpointError(f"{path} is not a file torch.save wrote (it starts with {head!r}); {fix}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
        if names:
            raise CheckpointError(f"{path} holds pickled objects beyond tensors and plain containers "
                                  f"({', '.join(names)}); refused, since loading them could run code; {fix}") from None
        raise CheckpointError(f"{path} is not a file torch.save wrote (its pickle is unreadable); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - torch reports a damaged file as any of a zoo of types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"{path} is truncated or damaged ({type(exc).__name__}: {first}); {fix}") from None


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_digest(state: Any) -> str:
    """sha256 of a nest of tensors and plain values: dtypes, shapes and bytes of the tensors, keys in sorted
    order. It follows the content, not the file: a weights dict digested before torch.save and after
    torch.load agrees, and any flipped byte of a tensor shows."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(f"{key!r}:".encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def save_file(obj: Any, path: str | Path) -> Path:
    """torch.save ``obj`` to ``path`` (atomically) and its sha256 to ``path``.sha256, for `load_file`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    digest = file_digest(tmp)
    # Without its digest a file loads unverified, with a warning; with a stale one it is refused: so the old
    # digest goes first and the new one comes last.
    _digest_file(path).unlink(missing_ok=True)
    tmp.replace(path)
    _atomic_write(_digest_file(path), digest + "\n")
    return path


def load_file(path: str | Path, *, map_location: Any = None, fix: str = "replace the file") -> Any:
    """What `save_file` wrote, checked against its digest first; a file without one loads with a warning."""
    path = Path(path)
    recorded = _digest_file(path)
    if recorded.is_file() and path.is_file():
        if file_digest(path) != recorded.read_text().strip():
            raise CheckpointError(f"{path} does not match the digest recorded when it was saved (damaged); {fix}")
    elif path.is_file():
        log.warning("%s has no digest beside it (saved before digests); loading it unverified", path)
    return safe_load(path, map_location=map_location, fix=fix)


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
            files = sorted(f for f in path.rglob("*") if f.is_file())
            digests = {f.relative_to(path).as_posix(): file_digest(f) for f in files}
            (path / _DIGESTS).write_text(json.dumps({"sha256": digests}, indent=1))
            (path / _DONE).write_text(json.dumps({"world_size": engine.world_size, "engine": engine.kind}))
            _atomic_write(self.folder / _LATEST, tag)  # a reader never sees it half-written
            self._prune(keep_also=tag)
        engine.barrier()
        return path

    def verify(self, tag: str) -> list[str]:
        """What is wrong with tag ``tag`` against the digests its save recorded, one line each ([] when intact).
        A tag saved before digests existed has nothing to check against: see `verifiable`."""
        path = self.folder / tag
        problem = _read_marker(path)[1]
        if problem:
            return [f"{path} {problem}"]
        if not (path / _DIGESTS).is_file():
            return []
        try:
            digests = json.loads((path / _DIGESTS).read_text())["sha256"]
            if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return [f"{path / _DIGESTS} is unreadable"]
        problems = []
        for name, want in sorted(digests.items()):
            file = path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                problems.append(f"{path / _DIGESTS} names a file outside the tag ({name!r})")
            elif not file.is_file():
                problems.append(f"{file} is missing")
            elif file_digest(file) != want:
                problems.append(f"{file} does not match the digest recorded at its save")
        return problems

    def verifiable(self, tag: str) -> bool:
        """Whether tag ``tag`` recorded digests (tags saved before they existed did not)."""
        return (self.folder / tag / _DIGESTS).is_file()

    def load(self, engine: Engine, *, tag: str | None = None) -> dict | None:
        """Restore the newest intact (or the named) tag into ``engine`` and this rank's RNGs; returns the saved
        ``state``, or None when the folder holds no complete checkpoint. Collective.

        Without ``tag``, a latest tag that fails its digests is skipped for the newest one that passes, with a
        warning naming both; when none passes, a `CheckpointError` lists them. A named tag must pass."""
        if tag is None:
            tag = self._newest_intact(engine)
            if tag is None:
                return None
        else:
            self._meta(self.folder / tag)  # an incomplete tag is refused as such
            problems = self.verify(tag)
            if problems:
                raise CheckpointError(f"checkpoint {self.folder / tag} is damaged: {'; '.join(problems)}; "
                                      "name another tag, or delete this one")
        path = self.folder / tag
        meta = self._meta(path)
        if meta.get("engine") != engine.kind:
            raise CheckpointError(f"checkpoint {path} was written by the {meta.get('engine')} engine, not "
                                  f"{engine.kind}; resume with the same engine or start from weights.pt")
        if not self.verifiable(tag):
            log.warning("checkpoint %s was saved without digests (by an older version): it cannot be verified; "
                        "loading it anyway", path)
        state = engine.load_states(path)
        rank_file = path / _rank_file(engine.rank)
        fix = f"delete {path} to resume from the checkpoint before it"
        rank_state = safe_load(rank_file, fix=fix) if rank_file.is_file() else {}
        if isinstance(rank_state, dict) and "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        else:
            # A new rank after a change of world size: its RNGs continue from this run's seeding.
            log.warning("checkpoint %s holds no RNG states for rank %d (saved with %s ranks); keeping the current "
                        "ones", path, engine.rank, meta.get("world_size"))
        return state

    def _newest_intact(self, engine: Engine) -> str | None:
        """Rank 0 checks the candidates newest first and every rank takes its answer, so that all ranks load
        the same tag (they must: loading is collective)."""
        verdict = None
        if engine.is_main:
            damaged, chosen = [], None
            for tag in self._candidates():
                problems = self.verify(tag)
                if not problems:
                    chosen = tag
                    break
                damaged.append((tag, problems))
            verdict = (chosen, damaged)
        chosen, damaged = engine.gather(verdict)[0]
        if damaged and chosen is None:
            listed = "; ".join(f"{tag}: {', '.join(problems)}" for tag, problems in damaged)
            raise CheckpointError(f"no intact checkpoint in {self.folder} ({listed}); delete {self.folder} to "
                                  "start this training over (outputs it finished are kept)")
        if engine.is_main:
            for tag, problems in damaged:
                log.warning("checkpoint %s is damaged (%s); falling back to %s", self.folder / tag,
                            "; ".join(problems), self.folder / chosen)
        return chosen

    def _candidates(self) -> list[str]:
        """Complete tags to resume from, the one ``latest`` names first, then newest first (``best*`` tags
        are not part of the sequence)."""
        latest = self.latest()
        rest = [t for t in reversed(self.tags()) if t != latest and not t.startswith("best")]
        return ([latest] if latest else []) + rest

    @staticmethod
    def _meta(path: Path) -> dict:
        meta, problem = _read_marker(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} {problem}; delete it or name another tag")
        return meta

    def _prune(self, *, keep_also: str) -> None:
        if self.keep is None:
            return
        rolling = [t for t in self.tags() if not t.startswith("best")]
        for old in rolling[:-self.keep] if self.keep > 0 else rolling:
            if old != keep_also:
                shutil.rmtree(self.folder / old, ignore_errors=True)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def _read_marker(path: Path) -> tuple[dict, str | None]:
    """A tag's ``done`` marker, or what is wrong with it."""
    try:
        meta = json.loads((path / _DONE).read_text())
    except FileNotFoundError:
        return {}, "is incomplete (no 'done' marker)"
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        return {}, "has a 'done' marker that is not the JSON a save writes"
    return meta, None


def saved_world_size(folder: str | Path, tag: str) -> int | None:
    """How many ranks saved tag ``tag`` of the checkpoint folder ``folder`` (None when its marker does not say)."""
    size = _read_marker(Path(folder) / tag)[0].get("world_size")
    return size if isinstance(size, int) else None
