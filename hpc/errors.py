"""What hpc raises for a mistake or a damaged file the user can fix. No torch here: a CLI imports it to decide
what it prints as one line, before any verb pays for torch."""


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used as it is (missing, incomplete, damaged, holding more
    than tensors, or of another engine); the message names the file and what to do."""
