"""The stream intake's fair queue (SCENARIOS S13): one FIFO per principal, served so that a
flooding principal adds at most its quantum to a batch while others are active."""

from __future__ import annotations

import time

import pytest
from nats.aio.msg import Msg

from bus_guard.intake import _jetstream
from bus_guard.intake._jetstream import FairQueue


def _msg(principal: str, n: int) -> Msg:
    return Msg(None, subject=f"guard.in.{principal}.tools.search", data=str(n).encode())  # type: ignore[arg-type]


def _names(msgs: list[Msg]) -> list[tuple[str, int]]:
    return [(m.subject.split(".")[2], int(m.data)) for m in msgs]


def test_a_flood_adds_at_most_its_quantum_while_others_are_active() -> None:
    q = FairQueue("guard.in.", quantum=4)
    for n in range(30):
        q.add(_msg("flooder", n))
    q.add(_msg("agent-1", 0))
    q.add(_msg("agent-2", 0))
    batch = _names(q.take(128))
    assert ("agent-1", 0) in batch and ("agent-2", 0) in batch
    assert sum(p == "flooder" for p, _ in batch) == 4
    assert len(q) == 26
    # Its own order is kept, batch after batch.
    q.add(_msg("agent-1", 1))
    rest = [n for p, n in _names(q.take(128)) if p == "flooder"]
    assert rest == [4, 5, 6, 7]


def test_a_queue_that_keeps_growing_gets_an_eighth_of_it() -> None:
    q = FairQueue("guard.in.", quantum=4)
    for n in range(400):
        q.add(_msg("flooder", n))
    q.add(_msg("agent-1", 0))
    batch = _names(q.take(128))
    assert sum(p == "flooder" for p, _ in batch) == 400 >> 3
    assert ("agent-1", 0) in batch


def test_a_principal_alone_gets_whole_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    q = FairQueue("guard.in.", quantum=4)
    for n in range(300):
        q.add(_msg("agent-1", n))
    assert [n for _, n in _names(q.take(128))] == list(range(128))
    # Another principal seen long ago no longer caps it.
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    q.add(_msg("agent-2", 0))
    assert len(q.take(128)) < 128  # both active: capped
    now[0] += 2 * _jetstream.RECENT_S
    for n in range(300, 400):
        q.add(_msg("agent-1", n))
    assert len(q.take(128)) == 128


def test_without_a_quantum_it_is_arrival_order() -> None:
    q = FairQueue("guard.in.", quantum=0)
    for n in range(10):
        q.add(_msg("flooder" if n % 3 else "agent-1", n))
    assert [n for _, n in _names(q.take(100))] == list(range(10))


def test_subjects_outside_the_prefix_form_one_group() -> None:
    q = FairQueue("guard.in.", quantum=2)
    q.add(Msg(None, subject="nonsense", data=b"0"))  # type: ignore[arg-type]
    q.add(_msg("agent-1", 1))
    assert len(q.take(10)) == 2 and len(q) == 0


def test_drain_returns_everything_whatever_the_shares() -> None:
    q = FairQueue("guard.in.", quantum=2)
    for n in range(40):
        q.add(_msg("flooder", n))
    q.add(_msg("agent-1", 0))
    drained = _names(q.drain())
    assert len(drained) == 41 and len(q) == 0 and q.take(10) == []
    assert [n for p, n in drained if p == "flooder"] == list(range(40))
