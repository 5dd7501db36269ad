"""The one exception type that reaches the user as a single line."""


class DlmError(Exception):
    """Bad input or an unusable file: the CLI prints ``dlm: error: <message>`` and exits 2.

    Raise it for anything the user can fix (a missing file, an unknown name, a mismatched
    checkpoint). Bugs stay ordinary exceptions so that their tracebacks reach us.
    """
