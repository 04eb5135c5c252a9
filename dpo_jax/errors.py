"""Errors a user can cause and fix. The command line turns these into exit status 2 and one paragraph."""


class UserError(Exception):
    """Bad input from the user: a path, a checkpoint, an option. The message says how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as asked: missing, unused or mis-shaped tensors, unknown type."""
