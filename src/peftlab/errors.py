"""Errors meant for people: one line that names the file, field or row and what would be valid."""

import warnings


class PeftlabError(Exception):
    """Bad input or an impossible request. The CLI prints the message on one line and exits 2."""


class PlanMismatchError(PeftlabError):
    """What was wrapped differs from the plan (a library skipped or added a module)."""


class PeftlabWarning(UserWarning):
    """Input that peftlab accepted after changing it, or that will probably not give what was meant (the CLI
    prints `warning: ...` on one line)."""


def warn(message: str) -> None:
    warnings.warn(message, PeftlabWarning, stacklevel=2)
