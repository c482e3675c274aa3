"""The one exception type for problems the user can fix (bad data, config, workdir), and how
any error reads as one line."""


class UserError(ValueError):
    """A problem with the user's input (data, config, workdir, prompt): the CLIs print its
    message as one line and exit 1; library callers can catch it as a ValueError."""


def one_line(error: BaseException) -> str:
    """The message of `error` on one line (absl and ml_collections nest and format theirs)."""
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError())
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]  # config_flags embeds the config file's traceback: keep its last line
    return " ".join(lines)


def flag_error_message(error: BaseException) -> str:
    """One line for an error raised while parsing flags or a config file's overrides."""
    prefix = "unknown config field " if isinstance(error, (AttributeError, KeyError)) else ""
    return f"{prefix}{one_line(error)}"
