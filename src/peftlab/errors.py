"""Errors meant for people: one line that names the file, field or row and what would be valid."""


class PeftlabError(Exception):
    """Bad input or an impossible request. The CLI prints the message on one line and exits 2."""


class PlanMismatchError(PeftlabError):
    """What was wrapped differs from the plan (a library skipped or added a module)."""
