"""Errors a user can cause, carried up to the command line as one line each."""


class UserError(Exception):
    """A problem with the user's input or settings.

    The message is one line that names the input and says what to do; the command line
    prints it without a traceback.
    """
