"""User errors: what the CLI turns into one line and exit status 2. Anything else keeps its traceback.

`UserError` is the package's type: a mistake the user can fix (bad config, bad path, bad input), its
message saying what and how. `hpc` and `data_prep` stand alone (they import nothing of stroke_tss), so each
has its own base, which the CLI treats the same way: `data_prep.errors.InputError` (StoreError is one)
and `hpc.errors.CheckpointError` (a damaged, unsafe or foreign checkpoint or weights file).
"""

from data_prep.errors import InputError
from hpc.errors import CheckpointError


class UserError(ValueError):
    """A mistake the user can fix (bad config, bad path, bad input); the message says what and how."""


USER_ERRORS: tuple[type[Exception], ...] = (UserError, InputError, CheckpointError)
"""Every user-error base the CLI prints as one line."""
