"""The error class for mistakes a user can fix (a bad config value, file, checkpoint or workdir).

`main` prints such errors as one line (`error: ...`) and exits with status 1; any other exception
is a bug and keeps its traceback. Subclassing ValueError keeps `except ValueError` callers working.
"""


class UserError(ValueError):
  """Bad user input; the message names the file, row or config field and what was expected."""
