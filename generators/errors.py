"""Domain errors shared by every package.

They live in the lowest layer (``generators``) so that ``train``, ``privacy_filters`` and ``app`` can all
raise them without breaking the import direction. ``app.errors`` maps them to CLI exit codes and HTTP
status codes in one place.
"""


class SynthCohortError(Exception):
    """Base class: an expected failure with a message meant for the user."""


class InvalidInput(SynthCohortError):
    """The caller gave something unusable (bad file, wrong shape, unknown label, bad flag)."""


class NotFound(SynthCohortError):
    """A named thing (store, model, job, dataset) does not exist."""


class Conflict(SynthCohortError):
    """The target already exists or is in a state that forbids the operation."""


class PrivacyPolicy(SynthCohortError):
    """The operation would break a privacy rule (e.g. serving a model without a DP guarantee)."""


class PrivacyWarning(UserWarning):
    """A privacy choice that is allowed but weaker than recommended (e.g. δ above 1/(10·N))."""
