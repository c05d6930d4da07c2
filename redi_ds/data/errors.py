class DataError(ValueError):
    """A user-caused data problem; its message is one line naming the file, line and field."""
