"""User-facing errors.

Every problem a user can cause (a bad file, an unsupported op, a shape mismatch, a
negative eps) is raised as a :class:`DualgraphError` whose message is one line that names
the problem and says what to do. The CLI prints it as ``dualgraph: error: <message>`` and
exits with status 2; anything else is a bug and keeps its traceback.
"""


class DualgraphError(Exception):
    """A problem with the user's input, reported as one line (CLI exit code 2)."""


class UnsupportedOpError(DualgraphError):
    """The model uses ops that a frontend, the interpreter or the dual registry lacks."""


class InternalError(Exception):
    """A broken invariant inside dualgraph (a bug, never the user's fault): it keeps its
    traceback so that it can be reported."""
