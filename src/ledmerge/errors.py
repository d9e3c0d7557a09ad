"""The one exception type users see: the CLI prints it as a single line and exits non-zero."""


class LedmergeError(Exception):
    """A problem with the user's input (config, checkpoint, data), stated with its fix."""


def corrupt_file(path, why: str) -> LedmergeError:
    """The error for a file that cannot be parsed: it is corrupt or truncated."""
    return LedmergeError(f"cannot read {path} ({why}): the file is corrupt or truncated; re-create or re-download it")


def nan_scores() -> LedmergeError:
    """The error for scores (or task-vector magnitudes ranked like them) that hold NaN."""
    return LedmergeError("scores contain NaN: the scoring run diverged (try dtype float32)")
