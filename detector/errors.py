"""The one exception type users see: its message is printed as a single line by the command."""


class CellRCNNError(Exception):
    """A problem with the user's input or environment, explained in one line."""
