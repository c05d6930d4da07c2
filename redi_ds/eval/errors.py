"""Errors of the evaluation package."""

from redi_ds.errors import UserError


class EvalError(UserError):
    """A user-caused evaluation problem (bad model path, unknown benchmark, malformed data file).

    Its message is one line; the CLI prints it as ``error: <message>`` and exits with status 2.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
