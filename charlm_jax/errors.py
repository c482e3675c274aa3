"""The one exception type for problems the user can fix (bad data, config, workdir)."""


class UserError(ValueError):
    """A problem with the user's input (data, config, workdir, prompt): the CLIs print its
    message as one line and exit 1; library callers can catch it as a ValueError."""
