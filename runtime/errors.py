"""One exception type for everything a user can get wrong.

The CLI prints `error: <message>` for a PyllmError and exits 1, with no traceback
(PYLLM_DEBUG=1 shows it). Anything else is a bug and keeps its traceback.
"""


class PyllmError(Exception):
    """A user-facing error: bad model file, bad flag value, prompt too long, ..."""
