"""Errors jfig raises for bad input. Each names what is wrong and what was expected."""
class JfigError(Exception):
    """Base class of every error jfig raises on purpose."""
class FormatError(JfigError, ValueError):
    """A file is missing, truncated, corrupt, or lacks a required field."""
class ShapeError(JfigError, ValueError):
    """An array has the wrong shape, rank or dtype for where it is used."""
class SiteError(JfigError, KeyError):
    """A site name is unknown to the model, or malformed."""
    def __str__(self):  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""
class OptionError(JfigError, ValueError):
    """A build option is unknown, or its value has the wrong type or is out of range.

    `key` is the option as it was given (e.g. "alpha" or "measure.method"), so a config reader can
    point at the line that set it."""
    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key
