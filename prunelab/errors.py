"""Errors that prunelab raises for bad input, each naming the field and the fix."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (libraries put tracebacks and hints after it), or
    its type's name when it has none: what a one-line error message quotes."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and says how to fix it."""

    def __init__(self, field: str, problem: str, fix: str = ""):
        self.field = field
        self.problem = problem
        self.fix = fix
        msg = f"{field}: {problem}" if field else problem
        if fix:
            msg += f" — fix: {fix}"
        super().__init__(msg)


class DataNotFoundError(ConfigError, FileNotFoundError):
    """A data set or file the configuration points at is not on disk."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss."""


class CorruptFileError(ValueError):
    """A stored file failed its checksum or could not be parsed; the message names the file."""
