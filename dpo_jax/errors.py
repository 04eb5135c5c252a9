"""Errors a user can cause and fix. The command line turns these into exit status 2 and one paragraph."""


class UserError(Exception):
    """Bad input from the user: a path, a checkpoint, an option. The message says how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded as asked: missing, unused or mis-shaped tensors, unknown type."""


def lfs_pointer_hint(path) -> str:
    """' It is a Git LFS pointer, ...' when `path` holds one instead of its content (a repository cloned without
    git-lfs), else ''."""
    try:
        with open(path, "rb") as f:
            pointer = f.read(64).startswith(b"version https://git-lfs.github.com/spec/")
    except OSError:
        return ""
    return (" It is a Git LFS pointer, not the file itself (the repository was cloned without git-lfs): run "
            "`git lfs pull` in its directory, or download the model with `hf download`.") if pointer else ""
