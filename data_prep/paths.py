"""Subject ids and the paths built from them: the one place an id becomes a file name.

A subject id is 1-64 characters of `A-Z a-z 0-9 . _ -`, starting with a letter or a digit. That keeps
every id a plain file name on every file system (no `/`, no `..`, no hidden `.x` files, no leading `-` that a
shell tool would read as an option, nothing a CSV or a log line would mangle) and short enough that
`<id>_<method>_<layer>.nii.gz` stays far below the 255-byte name limit. BIDS ids (`sub-01`, `sub-strokecase0001`)
and hospital accession numbers fit.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from data_prep.errors import InputError

MAX_ID_LENGTH = 64
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ID_RULE = f"1-{MAX_ID_LENGTH} characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"


def id_problem(subject_id: object) -> str | None:
    """Why `subject_id` is not a safe id, or None when it is."""
    if not isinstance(subject_id, str) or not subject_id:
        return "empty"
    if len(subject_id) > MAX_ID_LENGTH:
        return f"{len(subject_id)} characters, more than {MAX_ID_LENGTH}"
    if not _ID.fullmatch(subject_id):
        bad = sorted({c for c in subject_id if not (c.isascii() and (c.isalnum() or c in "._-"))})
        if bad:
            return "contains " + " ".join(repr(c) for c in bad)
        return f"starts with {subject_id[0]!r}"
    return None


def shown(subject_id: object, limit: int = 40) -> str:
    """The id as an error line may show it: quoted, control characters escaped, long ones cut."""
    text = repr(str(subject_id))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_subject_id(subject_id: object, *, file: str | Path | None = None) -> str:
    """The id itself, or InputError naming it and the rule."""
    problem = id_problem(subject_id)
    if problem is not None:
        raise InputError(f"unsafe subject id {shown(subject_id)}: {problem}", field="subject_id", file=file,
                         hint=f"rename the subject: ids are {ID_RULE}")
    return str(subject_id)


def subject_path(folder: str | Path, subject_id: str, suffix: str = "") -> Path:
    """`folder/<subject_id><suffix>`, refused (InputError) unless the id is safe and the path stays in `folder`."""
    check_subject_id(subject_id)
    folder = Path(folder)
    path = folder / f"{subject_id}{suffix}"
    # the id rule already forbids separators; this also catches a suffix that climbs, and is what the rule is for
    if Path(os.path.normpath(path)).parent != Path(os.path.normpath(folder)):
        raise InputError(f"path {str(path)!r} would leave folder {str(folder)!r}", subject_id=shown(subject_id),
                         field="subject_id", hint=f"subject ids are {ID_RULE}")
    return path
