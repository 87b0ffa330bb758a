"""The error every function raises for input it cannot use (below every layer)."""

__all__ = ["InputError"]


class InputError(ValueError):
    """Raised when the input data is not what a function needs; the message says how to fix it."""
