"""The data loaders' error type (its own module, so every loader can import it without importing another)."""


class DataError(ValueError):
    """A dataset could not be loaded or does not have the expected shape."""
