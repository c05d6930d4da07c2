from redi_ds.errors import UserError


class DataError(UserError):
    """A user-caused data problem; its message is one line naming the file, line and field."""
