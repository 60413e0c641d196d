"""A tiny run of every benchmark program: they work, and report what they claim to.

Not a measurement: counts are minimal so the whole file takes a few seconds. Cedar and
Rego parts are skipped (with the programs' own note) when the bench extra is absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import decide, harness, latency, memory, relay, rulesets, stream_relay
from bench import verify as verify_bench
from bench.common import percentile, table
from bus_guard.server import NatsServer
from bus_guard.signing._keys import generate_key

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server() -> object:
    with NatsServer(jetstream=False) as s:
        yield s


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_key(tmp_path_factory.mktemp("keys"))[0]


def test_decide_smoke() -> None:
    examples = decide.run_examples(count=100, runs=1, budget_s=0.2)
    assert set(examples["median"]) == {
        "decode_only (baseline)",
        "decide (decode+authorize)",
        "authorize (pre-decoded)",
    }
    generated = decide.run_families(["layered", "tenants"], [10, 30], 1, 0.05, cold_pairs=300)
    expected = {"decide cold", "decide warm", "evaluate cold", "evaluate warm"}
    expected |= {"cedar"} if rulesets.HAVE_CEDAR else set()
    expected |= {"rego"} if rulesets.HAVE_REGO else set()
    for family in ("layered", "tenants"):
        for n in ("10", "30"):
            row = generated["families"][family][n]
            assert row["rules"] == int(n)
            assert row["cold_distinct_pairs"] >= 300  # and the aimed requests' pairs
            assert row["agreement"]["checked"] == 400  # the whole cold list agreed
            assert set(row["median"]) == expected
            assert all(m["per_s"] > 0 and m["n"] > 0 for m in row["median"].values())
            assert row["load_s"] > 0 and row["memory"]["peak_mib"] > 0
            assert row["growth"]["decide cold"] > 0
    assert ("cedar skipped" in " ".join(generated["notes"])) is not rulesets.HAVE_CEDAR
    rows = decide.family_rows(generated["families"])
    assert len(rows) == 4 and all(len(r) == len(decide.FAMILY_HEADERS) for r in rows)


@pytest.mark.parametrize("family", sorted(rulesets.FAMILIES))
def test_every_family_agrees_with_the_reference(family: str, tmp_path: Path) -> None:
    # Every engine present (and always the reference interpreter) decides every request
    # of the family alike, at two sizes; and the family has what its docstring promises.
    for n in (10, 60):
        spec = rulesets.FAMILIES[family](n)
        assert len(spec.rules) == n
        engines = rulesets.Engines(spec, tmp_path)
        cold, warm = rulesets.request_lists(spec, cold_pairs=600, warm_count=300)
        assert rulesets.distinct_pairs(cold[: len(cold) // 2]) > 250  # pairs spread out
        assert rulesets.distinct_pairs(warm) <= rulesets.WARM_PAIRS + 300 // 4 * 2
        checked = engines.check(cold + warm)
        assert len(checked["outcomes"]) >= 3, checked  # not one outcome for everything
        assert rulesets.cedar_text(spec).count("@id(") == n
        assert rulesets.rego_text(spec).count(" if {  # ") == n


def test_cold_lists_cover_fifty_thousand_pairs() -> None:
    for family in rulesets.FAMILIES:
        spec = rulesets.FAMILIES[family](10)
        assert len(spec.principals) * len(spec.actions) >= 50_000, family


def test_per_principal_semantics(tmp_path: Path) -> None:
    policies = rulesets.Engines(rulesets.per_principal(12), tmp_path).policies
    assert policies.rule_count == 12

    def allowed(principal: str, action: str, resource: str, amount: int) -> bool:
        req = rulesets.BenchRequest(principal, action, resource, {"amount": amount})
        return policies.evaluate(rulesets.bus_guard_request(req)).allowed

    assert allowed("agent-3", "svc3.read", "doc:3/x", 130)
    assert not allowed("agent-3", "svc3.read", "doc:3/x", 131)
    assert not allowed("agent-3", "svc3.read", "doc:4/x", 1)
    assert not allowed("agent-9", "svc9.read", "doc:9/x", 1)
    assert allowed("x", "tools.search", "doc:a", 1)
    assert not allowed("x", "tools.search", "doc:sanctioned", 1)


def test_verify_smoke() -> None:
    out = verify_bench.run_once(count=64, batch=16)
    assert out["verify_batched_per_s"] > 0 and out["verify_per_message_per_s"] > 0
    assert out["artifact_bytes_batched"] > out["artifact_bytes_per_message"]


def test_relay_smoke(server: NatsServer, key: Path) -> None:
    res = relay.run(server.url, key, 100, 1, 50, scale=False, want_batched=True, prototype=True)
    assert set(res["median_per_s"]) >= {"bare", "core", "prototype-batched"}
    assert res["ratios"]["core_vs_bare"] > 0
    # CPU per intent of the relay processes: the gateway does more than the bare relay.
    cpu = res["median_cpu_us_per_intent"]
    assert 0 < cpu["bare"] < cpu["core"]
    assert res["ratios"]["core_cpu_vs_bare"] > 1
    if harness.supports_artifacts_flag():
        assert "core-batched" in res["median_per_s"]
    else:
        assert "core-batched skipped" in res["notes"][0]


def test_stream_relay_smoke(key: Path) -> None:
    # Every variant drains the same backlog through a JetStream server of its own run:
    # _measure raises unless every intent reached the exec stream exactly once.
    with NatsServer() as js_server:
        res = stream_relay.run(js_server.url, key, 60, 1, batched=True, scale=True)
    assert set(res["median_per_s"]) == {"bare", "stream", "stream-batched", "stream-batched x2"}
    assert all(v > 0 for v in res["median_per_s"].values())
    assert res["ratios"]["stream_batched_x2_vs_x1"] > 0


def test_latency_smoke(server: NatsServer, key: Path) -> None:
    res = latency.run(server.url, key, seconds=0.1, max_count=100, count_for_max=200, loads=(0.5,))
    row = res["loads"]["50%"]
    assert row["bus_guard"]["received"] == row["bare"]["received"] == row["bus_guard"]["count"]
    assert 0 < row["bare"]["p50_us"] <= row["bare"]["p99.9_us"]
    assert set(row["added"]) == {"p50_us", "p99_us", "p99.9_us"}


def test_memory_smoke(server: NatsServer, key: Path) -> None:
    res = memory.track(server.url, harness.guard_cmd(server.url, key), 200, 2, 50)
    assert res["received"] == 200
    assert len(res["rss_kib"]) == 3 and res["rss_peak_kib"] > 10_000


def test_suite_entry_point_lists_every_program() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only=none"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert out.stdout == ""
    from bench.__main__ import SMOKE, SUITE

    assert (
        set(SUITE)
        == set(SMOKE)
        == {
            "decide",
            "verify",
            "relay",
            "stream_relay",
            "latency",
            "latency:batched",
            "memory",
            "flood",
        }
    )


def test_helpers() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 99.9) == 4.0
    assert table(["a"], [[1.5]]).splitlines() == ["| a    |", "|------|", "| 1.50 |"]
    assert harness.index_of(harness.payload(123456, 1.0)) == 123456


def test_flood_smoke(tmp_path: Path) -> None:
    from bench import flood

    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "bench.yaml").write_text(flood.bundle(limit=5))
    key = generate_key(tmp_path)[0]
    with NatsServer(store_dir=tmp_path / "js") as s:
        res = flood.run(
            s.url,
            key,
            tmp_path / "policies",
            seconds=1.0,
            others_rate=40,
            limit=5,
            factor=20,
            runs=1,
            mode="stream",
        )
    [run] = res["runs"]
    assert run["unloaded"]["others_received"] == run["unloaded"]["others_sent"] == 40
    assert run["flood"]["others_lost"] == 0 and res["others_lost"] == 0
    assert run["flood"]["flood_sent"] == 100
    assert 0 < run["flood"]["flood_allowed"] <= 10  # 5 a second, over one second and a bit
    assert run["flood"]["flood_allowed_max_per_1s_window"] <= 5
    assert res["p99_ratio_median"] > 0
