"""The one exception type for mistakes a user can make and fix."""


class UserError(Exception):
    """A problem with the user's input or environment.

    The command line prints it as a single ``error: <message>`` line and exits with status 2.
    The message names the problem and the fix; it carries no ``error:`` prefix itself.
    """


class RunStopped(Exception):
    """Training ended early, on request (a signal) or by a fault (divergence, a lost process).

    The command line prints ``error: <message>`` and exits with ``exit_code``; the run's last
    complete epoch stays on disk and ``--resume`` continues from it.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
