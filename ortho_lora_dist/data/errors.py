"""The error every data problem raises: one message naming the task, file, line (or row) and key."""


class DataError(ValueError):
    """Bad task data, naming the file, line and key."""
