"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem with the user's input or environment.

    The command line prints it as a single ``error: <message>`` line and exits with status 2.
    The message names the problem and the fix; it carries no ``error:`` prefix itself.
    """
