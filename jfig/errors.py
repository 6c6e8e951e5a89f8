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
