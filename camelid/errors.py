"""One exception type for every problem a user can fix: its message is one line naming the problem and the fix."""

from __future__ import annotations


class CamelidError(ValueError):
    """A user-facing error. The CLI prints `error: <message>` and exits 1, without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
