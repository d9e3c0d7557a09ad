"""The one exception type users see: the CLI prints it as a single line and exits non-zero."""


class LedmergeError(Exception):
    """A problem with the user's input (config, checkpoint, data), stated with its fix."""


def corrupt_file(path, why: str) -> LedmergeError:
    """The error for a file that cannot be parsed: it is corrupt or truncated."""
    return LedmergeError(f"cannot read {path} ({why}): the file is corrupt or truncated; re-create or re-download it")
