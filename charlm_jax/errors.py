"""The one exception type for problems the user can fix (bad data, config, workdir)."""


class UserError(Exception):
    """A problem with the user's input; the CLI prints its message as one line and exits 1."""
