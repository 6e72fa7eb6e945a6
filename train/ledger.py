"""The privacy budget ledger of a cohort store: every release computed from its patients, composed.

Every model trained from one store spends from the same patients, so the store keeps one private,
append-only ledger (``STORE/privacy_ledger.jsonl``, 0600): the patient-count release written at ingestion,
then one entry per training run — a reservation of the planned steps when the run starts and the steps
actually taken when it ends (the run's latest entry counts). What the store has spent is the ε, at the
store's δ, of the composition of every counted history, computed by the accountant (PRV by default), not a
naive sum of ε values. Writes take an exclusive lock on the store directory and replace the file atomically;
old lines are never changed.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from generators.atomic import write_atomic
from generators.errors import InvalidInput, PrivacyPolicy
from train.accounting import Mechanism, epsilon_of

LEDGER_FILE = "privacy_ledger.jsonl"
COMPOSITION = "accountant composition of every release's privacy history (not a sum of ε values)"


@dataclass(frozen=True)
class Budget:
    """What a store may spend in total, and what it has spent."""

    epsilon: float
    delta: float
    spent: float
    accountant: str

    @property
    def remaining(self) -> float:
        return max(0.0, self.epsilon - self.spent)


class PrivacyLedger:
    """Append-only record of the releases computed from one store's patients."""

    def __init__(self, store_path: Path, *, budget_epsilon: float, budget_delta: float) -> None:
        self.path = Path(store_path) / LEDGER_FILE
        self.budget_epsilon = budget_epsilon
        self.budget_delta = budget_delta

    # --------------------------------------------------------------------------------------- read
    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"the store's privacy ledger is corrupt ({exc}); restore it from a backup") from None

    def counted(self, entries: list[dict] | None = None) -> list[dict]:
        """The latest entry of every release (a run's final entry replaces its reservation)."""
        latest: dict[str, dict] = {}
        for entry in entries if entries is not None else self.entries():
            latest[entry["release"]] = entry
        return list(latest.values())

    def history(self, *, excluding: str | None = None) -> list[Mechanism]:
        return [tuple(m) for entry in self.counted() if entry["release"] != excluding for m in entry["history"]]

    def has_non_private_release(self) -> bool:
        """A model trained WITHOUT DP from this store: its patients have no guarantee left (ε = ∞)."""
        return any(entry.get("not_private") for entry in self.counted())

    def budget(self, accountant: str = "prv") -> Budget:
        if self.has_non_private_release():
            return Budget(self.budget_epsilon, self.budget_delta, float("inf"), accountant)
        spent = epsilon_of(self.history(), delta=self.budget_delta, accountant=accountant)
        return Budget(self.budget_epsilon, self.budget_delta, spent, accountant)

    def projected(self, release: str, history: list[Mechanism], accountant: str = "prv") -> float:
        """ε the store would have spent with ``release`` counted as ``history``."""
        if self.has_non_private_release():
            return float("inf")
        return epsilon_of([*self.history(excluding=release), *history], delta=self.budget_delta, accountant=accountant)

    # -------------------------------------------------------------------------------------- write
    def record(self, release: str, history: list[Mechanism], **details: object) -> None:
        """Append one entry (atomically: the whole file is rewritten to a temp file and renamed)."""
        with self._locked():
            self._append([self._entry(release, history, details)])

    def reserve(
        self,
        release: str,
        history: list[Mechanism],
        *,
        accountant: str,
        allow_over_budget: bool,
        **details: object,
    ) -> float:
        """:meth:`check` and :meth:`record` under one lock, so two runs starting together cannot both pass a check
        that only one of them fits; returns the ε the store has then spent."""
        with self._locked():
            projected = self.check(history, accountant=accountant, allow_over_budget=allow_over_budget, release=release)
            self._append([self._entry(release, history, {**details, "accountant": accountant})])
        return projected

    def carry_over(self, entries: list[dict], **details: object) -> None:
        """Copy another ledger's entries in, marked with ``details`` (a replaced store's ledger follows its
        patients into the new store: re-ingesting them does not reset what they have spent)."""
        with self._locked():
            self._append([{**entry, **details} for entry in entries])

    @staticmethod
    def _entry(release: str, history: list[Mechanism], details: dict) -> dict:
        return {
            "release": release,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "history": [[float(s), float(q), int(t)] for s, q, t in history],
            **details,
        }

    def _append(self, entries: list[dict]) -> None:
        """Add lines (the caller holds the lock): the old file plus the new lines go to a temp file, renamed."""
        old = self.path.read_bytes() if self.path.is_file() else b""
        lines = "".join(json.dumps(entry) + "\n" for entry in entries).encode()
        write_atomic(self.path, lambda tmp: Path(tmp).write_bytes(old + lines), durable=True)

    def check(
        self, history: list[Mechanism], *, accountant: str, allow_over_budget: bool, release: str | None = None
    ) -> float:
        """Refuse (``PrivacyPolicy``) a release that would take the store past its budget; writes nothing.

        Returns the ε the store would have spent with ``release`` counted as ``history``.
        """
        projected = self.projected(release or "", history, accountant)
        if projected > self.budget_epsilon * (1 + 1e-6) and not allow_over_budget:
            if self.has_non_private_release():
                raise PrivacyPolicy(
                    "a model WITHOUT differential privacy was trained from this store, so its patients have no "
                    "privacy budget left; use a new store, or pass --allow-over-budget after the privacy officer "
                    "has agreed"
                )
            spent = self.budget(accountant).spent
            raise PrivacyPolicy(
                f"this run would take the store's privacy spend to ε = {projected:.2f} (already spent {spent:.2f} "
                f"of its budget {self.budget_epsilon:g} at δ = {self.budget_delta:g}, composed by the {accountant} "
                "accountant); train with a smaller --epsilon, or pass --allow-over-budget after the privacy "
                "officer has agreed"
            )
        return projected

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the store directory (the ledger file itself is replaced, so it cannot hold one)."""
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
