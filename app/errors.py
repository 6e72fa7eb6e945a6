"""The one place where domain errors become CLI exit codes (and, later, HTTP status codes)."""

from generators.errors import Conflict, InvalidInput, NotFound, PrivacyPolicy, SynthCohortError

# Order matters: the first matching class wins.
EXIT_CODES: tuple[tuple[type[SynthCohortError], int], ...] = (
    (InvalidInput, 2),
    (NotFound, 3),
    (Conflict, 4),
    (PrivacyPolicy, 5),
    (SynthCohortError, 1),
)


def exit_code_for(error: SynthCohortError) -> int:
    """Return the process exit code for a domain error."""
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 1
