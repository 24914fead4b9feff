"""The one exception type for problems the user can fix.

Everything that a user can get wrong (a flag, a file, a folder, a checkpoint) raises
`UserError` with a message that names the culprit and the fix. The CLI turns it into one
line on stderr and exit code 2; nothing else is ever shown as a traceback to the user.
"""

from __future__ import annotations

import argparse


class UserError(Exception):
    """A bad flag, file, folder or checkpoint: printed as one line, exit code 2."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the tool commands: a bad flag is a UserError (one line, exit 2), not a usage block."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see `{self.prog} --help`)")
