"""Input errors that name the subject, the file and the field, and say what to do."""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """A user's input is wrong: str() is one line naming subject, file, field and the fix."""

    def __init__(self, problem: str, *, subject_id: str | None = None, file: str | Path | None = None,
                 field: str | None = None, hint: str = "") -> None:
        self.subject_id = subject_id
        self.file = None if file is None else str(file)
        self.field = field
        self.problem = _worker_line(problem, type(self).__name__)
        self.hint = hint
        super().__init__(self._line())

    def _line(self) -> str:
        where = []
        if self.subject_id is not None:
            where.append(f"subject {self.subject_id}")
        if self.field is not None:
            where.append(f"field {self.field}")
        if self.file is not None:
            where.append(f"file {self.file}")
        head = ", ".join(where)
        text = f"{head}: {self.problem}" if head else self.problem
        return f"{text} ({self.hint})" if self.hint else text


def _worker_line(problem: str, name: str) -> str:
    """torch's DataLoader re-raises a worker's exception as `type(exc)(text)`, the text holding the worker's
    whole traceback; the error's own line is its last one, `[module.]Name: message`."""
    if "\nOriginal Traceback" not in problem:
        return problem
    last = problem.rstrip().splitlines()[-1]
    head, sep, message = last.partition(": ")
    return message if sep and head.rsplit(".", 1)[-1] == name else problem
