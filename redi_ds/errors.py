"""Errors with one-line messages. ``ConfigError`` (redi_ds.config) and ``DataError`` (redi_ds.data) are what a
user's input got wrong (exit 2); ``TrainingError`` is a run that went wrong (diverged, disk full, a
checkpoint that cannot be used; exit 1). Each names what happened, where, and the last good checkpoint."""


class TrainingError(RuntimeError):
    """A run that cannot go on; its message is one line. ``local``: raised on this rank only (the launcher
    then prints it on that rank too; errors every rank raises alike are printed by rank 0 alone)."""

    def __init__(self, msg: str, local: bool = False):
        super().__init__(msg)
        self.local = local
