"""The one place where domain errors become CLI exit codes and HTTP statuses, and job failures become what a
researcher may read."""

import errno

from generators.errors import Conflict, InvalidInput, NotFound, PrivacyPolicy, SynthCohortError


class InvalidField(InvalidInput):
    """Bad input in one named field of a request (``counts``, ``covariates``, ``formats``): forms show the message
    next to that field."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class Refused(SynthCohortError):
    """A well-formed request the service will not run now (quota, request size, storage); ``retry_after`` in
    seconds where waiting helps."""

    status = 429

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageFull(Refused):
    status = 507


class Gone(SynthCohortError):
    """The thing existed and was deleted (an expired dataset)."""


# Order matters: the first matching class wins.
EXIT_CODES: tuple[tuple[type[SynthCohortError], int], ...] = (
    (InvalidInput, 2),
    (NotFound, 3),
    (Conflict, 4),
    (PrivacyPolicy, 5),
    (SynthCohortError, 1),
)


HTTP_STATUSES: tuple[tuple[type[SynthCohortError], int], ...] = (
    (StorageFull, 507),
    (Refused, 429),
    (Gone, 410),
    (InvalidInput, 422),
    (NotFound, 404),
    (Conflict, 409),
    (PrivacyPolicy, 403),
    (SynthCohortError, 500),
)


def exit_code_for(error: SynthCohortError) -> int:
    """Return the process exit code for a domain error."""
    return _first_match(EXIT_CODES, error, 1)


def http_status_for(error: SynthCohortError) -> int:
    """Return the HTTP status a route answers a domain error with."""
    return _first_match(HTTP_STATUSES, error, 500)


def _first_match(table: tuple[tuple[type[SynthCohortError], int], ...], error: SynthCohortError, default: int) -> int:
    return next((code for cls, code in table if isinstance(error, cls)), default)


STORAGE_FAILURE = "the service could not write the dataset (storage full or not writable); the operator has been told"
STORAGE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EDQUOT)
PUBLIC_JOB_ERRORS: tuple[tuple[type[SynthCohortError], str], ...] = (
    (PrivacyPolicy, "refused by the service's privacy policy; the operator has been told"),
    (SynthCohortError, "the job could not be completed; the operator has been told"),
)


def public_job_error(error: BaseException) -> str:
    """What a researcher may read about a failed job: no paths, counts, scores or stack details.

    Errors that carry a message written for the public (``public_message``) keep it; everything else gets a
    generic sentence, and the full text goes to the server log and the admin-only audit log.
    """
    public = getattr(error, "public_message", None)
    if public:
        return str(public)
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        return STORAGE_FAILURE
    for cls, message in PUBLIC_JOB_ERRORS:
        if isinstance(error, cls):
            return message
    return "internal error; the operator has been told"
