"""Errors with one-line messages, and what each means for the exit status.

- ``UserError`` (exit 2): what a user's input got wrong (config, data, paths, options). ``ConfigError`` is
  defined here; ``DataError`` (redi_ds.data), ``EvalError`` (redi_ds.eval), ``PrepareError`` and
  ``NegativesError`` derive from it. Each names the file, line and field.
- ``TrainingError`` (exit 1): a run that went wrong (diverged, disk full, a checkpoint that cannot be used).
  Each names what happened, where, and the last good checkpoint.

This module imports nothing, so every other module can import it (no config <-> ds_config circle).
"""


class UserError(ValueError):
    """A user-caused problem; its message is one line."""


class ConfigError(UserError):
    """A configuration problem (YAML, overrides, the DeepSpeed JSON, world size); one line."""


class TrainingError(RuntimeError):
    """A run that cannot go on; its message is one line. ``local``: raised on this rank only (the launcher
    then prints it on that rank too; errors every rank raises alike are printed by rank 0 alone)."""

    def __init__(self, msg: str, local: bool = False):
        super().__init__(msg)
        self.local = local


def exit_code(e: BaseException) -> int:
    """2 for a user's error, 1 for a run that went wrong."""
    return 2 if isinstance(e, UserError) else 1
