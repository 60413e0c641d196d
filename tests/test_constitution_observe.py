"""An ordinary set in observe mode under a constitution (issue 12): the ordinary set's own
outcomes are let through marked ``would_deny``; the constitution's are enforced."""

from __future__ import annotations

import time
from pathlib import Path

from bus_guard.pipeline import decide
from bus_guard.policy._constitution import LayeredSet
from bus_guard.policy._load import load_policies

from .helpers import intent

CONSTITUTION = """\
bundle: constitution
version: "1"
rules:
  - {id: never-a-shell, effect: deny, actions: [tools.shell]}
  - {id: deploys-need-a-human, effect: escalate, actions: [ops.deploy]}
"""
ORDINARY = """\
bundle: tools
version: "1"
mode: {mode}
rules:
  - {{id: search-for-all, effect: allow, actions: [tools.search]}}
  - {{id: no-fetch, effect: deny, actions: [tools.http.get]}}
  - {{id: review, effect: escalate, actions: [tools.review]}}
"""


def _layered(tmp_path: Path, mode: str) -> LayeredSet:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "c.yaml").write_text(CONSTITUTION)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "o.yaml").write_text(ORDINARY.format(mode=mode))
    return LayeredSet(load_policies(tmp_path / "c"), load_policies(tmp_path / "o"))


def _decide(layered: LayeredSet, action: str) -> tuple[str, str, bool, tuple[str, ...]]:
    d = decide(layered, f"guard.in.agent-1.{action}", intent(action, "r"), now=time.time())
    return d.effect.value, d.reason.value, d.would_deny, d.rules


def test_an_observing_ordinary_set_stays_observing_under_the_constitution(
    tmp_path: Path,
) -> None:
    layered = _layered(tmp_path, "observe")
    # The ordinary set's own outcomes: let through, marked.
    assert _decide(layered, "tools.http.get") == ("allow", "denied_by_rule", True, ("no-fetch",))
    assert _decide(layered, "tools.review") == ("allow", "escalated_by_rule", True, ("review",))
    assert _decide(layered, "tools.other") == ("allow", "no_matching_rule", True, ())
    assert _decide(layered, "tools.search") == (
        "allow",
        "allowed_by_rule",
        False,
        ("search-for-all",),
    )
    # The constitution's: enforced (a deny stands, an escalation holds even what the
    # ordinary set would deny in observe mode).
    assert _decide(layered, "tools.shell") == ("deny", "denied_by_rule", False, ("never-a-shell",))
    assert _decide(layered, "ops.deploy")[:3] == ("hold", "escalated_by_rule", False)


def test_an_enforcing_ordinary_set_enforces(tmp_path: Path) -> None:
    layered = _layered(tmp_path, "enforce")
    assert _decide(layered, "tools.http.get") == ("deny", "denied_by_rule", False, ("no-fetch",))
    assert _decide(layered, "tools.other")[:3] == ("deny", "no_matching_rule", False)
    assert _decide(layered, "tools.shell")[:2] == ("deny", "denied_by_rule")
