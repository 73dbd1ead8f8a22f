"""The one exception type the CLI turns into a single line and exit status 2."""


class UserError(ValueError):
    """A mistake the user can fix (bad config, bad path, bad input); the message says what and how."""
