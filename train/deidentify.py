"""De-identification: keyed pseudonyms and the covariate rules.

Only pixels and geometry leave a scan file (see :class:`train.scan_io.Scan`); no header field is ever
copied. Real patient ids are replaced by an HMAC-SHA256 pseudonym keyed with a per-store secret, so the
same patient maps to the same pseudonym within a store but cannot be linked across stores or reversed
without the secret. The secret is never printed or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import unicodedata

from generators.demographics import AGE_MAX
from generators.errors import InvalidInput

SECRET_BYTES = 32
SEX_CODES = {"f": "F", "female": "F", "m": "M", "male": "M", "o": "O", "other": "O", "u": "U", "unknown": "U", "": "U"}


def normalise_patient_id(value: str) -> str:
    """The canonical form of a patient id: Unicode NFKC, whitespace removed, case-folded, and leading zeros
    dropped from every run of digits, so ``" MRN 000123"``, ``"mrn123"`` and ``"MRN-0123"`` → ``"mrn123"``,
    ``"mrn123"`` and ``"mrn-123"``."""
    text = "".join(unicodedata.normalize("NFKC", value).split()).casefold()
    return re.sub(r"\d+", lambda m: str(int(m.group())), text)


def new_secret() -> bytes:
    """A fresh random key for one store."""
    return secrets.token_bytes(SECRET_BYTES)


class Pseudonymizer:
    """Maps real identifiers to stable keyed pseudonyms; ``repr`` never shows the key."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise InvalidInput("pseudonymisation secret is too short")
        self._secret = secret

    def __repr__(self) -> str:
        return "Pseudonymizer(<secret hidden>)"

    def _digest(self, domain: str, value: str) -> str:
        return hmac.new(self._secret, f"{domain}\x00{value}".encode(), hashlib.sha256).hexdigest()

    def patient(self, real_id: str) -> str:
        """Pseudonym for a patient id (after :func:`normalise_patient_id`), e.g. ``p-3fa85f6457174562``."""
        return "p-" + self._digest("patient", normalise_patient_id(real_id))[:16]

    def split_rank(self, real_id: str) -> str:
        """The patient's place in the train/holdout ranking (:func:`train.split.split_patients`): a keyed hash of
        the normalised id, so the split follows the store's secret, not a public seed."""
        return self._digest("split", normalise_patient_id(real_id))

    def reference(self, text: str) -> str:
        """Pseudonym for anything else that may carry identifiers (file paths, CSV rows)."""
        return "ref-" + self._digest("reference", text)[:12]


def clean_age(value: str) -> int:
    """Parse an age in years; ages above 89 are reported as 90."""
    try:
        age = int(float(value))
    except ValueError:
        raise InvalidInput("age is not a number") from None
    if not 0 <= age <= 130:
        raise InvalidInput("age out of range 0-130")
    return min(age, AGE_MAX)


def clean_sex(value: str) -> str:
    """Normalise sex to one of ``F``, ``M``, ``O``, ``U``."""
    code = SEX_CODES.get(value.strip().lower())
    if code is None:
        raise InvalidInput("sex must be one of F, M, O, U")
    return code
