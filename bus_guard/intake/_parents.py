"""Parent decisions for lineage, looked up in the ledger stream (and cached)."""

from __future__ import annotations

import collections

import msgspec
from nats.js import JetStreamContext

from bus_guard.intake._jetstream import last_by_subject
from bus_guard.ledger._records import DECISION, LedgerRecord, LedgerSubjects, decode_record

__all__ = ("ParentLookup",)


class ParentLookup:
    """Decision records by id, from the ledger; allows and denials are cached (they are
    final), holds are looked up again (an approval may follow)."""

    def __init__(
        self, js: JetStreamContext, stream: str, subjects: LedgerSubjects, *, cache_size: int
    ) -> None:
        self._js = js
        self._stream = stream
        self._subjects = subjects
        self._cache: collections.OrderedDict[str, LedgerRecord] = collections.OrderedDict()
        self._cache_size = cache_size

    def remember(self, record: LedgerRecord) -> None:
        if record.kind == DECISION and record.effect in ("allow", "deny"):
            self._cache[record.decision_id] = record
            self._cache.move_to_end(record.decision_id)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    async def get(self, decision_id: str) -> LedgerRecord | None:
        """The record of *decision_id*, ``None`` if there is none; raises if it cannot look."""
        cached = self._cache.get(decision_id)
        if cached is not None:
            return cached
        stored = await last_by_subject(
            self._js, self._stream, self._subjects.any_decision(decision_id)
        )
        if stored is None:
            return None
        try:
            record = decode_record(stored.data)
        except msgspec.DecodeError:
            return None  # not a record: as good as unknown, and the audit will say why
        if record.decision_id != decision_id:
            return None
        self.remember(record)
        return record
