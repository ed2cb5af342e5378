"""Retention selection, without any filesystem: which sets go, which stay, and the reasons logged."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from kkua_backupd.config import RetentionConfig
from kkua_backupd.core.retention import (
    Candidate,
    Decision,
    Partial,
    age_text,
    name_problem,
    partial_name_ok,
    select,
    select_partials,
)

NOW = dt.datetime(2024, 3, 20, 12, 0, 0, tzinfo=dt.UTC)
PREFIX = {("postgres", "backup"): "kkua_backup_", ("redis", "backup"): "redis_backup_",
          ("postgres", "safety"): "safety_backup_before_restore_",
          ("redis", "safety"): "safety_backup_before_restore_"}
EXT = {"postgres": ".sql.gz", "redis": ".rdb.gz"}


def cand(days_old: float, *, kind: str = "postgres", type: str = "backup", status: str = "ok",
         problem: str | None = None, **overrides: object) -> Candidate:
    """A well-formed candidate created `days_old` days before NOW."""
    created = NOW - dt.timedelta(days=days_old)
    set_id = created.strftime("%Y%m%d_%H%M%S")
    prefix = PREFIX.get((kind, type), "kkua_backup_")
    fields: dict[str, object] = {
        "kind": kind, "type": type, "prefix": prefix, "id": set_id, "created_at": created, "status": status,
        "files": (f"{prefix}{set_id}{EXT[kind]}",), "manifest": f"{prefix}{set_id}.manifest.json",
        "bytes": 100, "problem": problem}
    fields.update(overrides)
    return Candidate(**fields)  # type: ignore[arg-type]


def by_id(decisions: list[Decision]) -> dict[str, Decision]:
    return {d.candidate.id: d for d in decisions}


def deleted(decisions: list[Decision]) -> set[str]:
    return {d.candidate.id for d in decisions if d.action == "delete"}


CFG = RetentionConfig(days=7, keep_last=3, safety_days=30, safety_keep_last=1)


def test_old_sets_go_but_the_newest_keep_last_good_ones_stay() -> None:
    sets = [cand(d) for d in (1, 2, 8, 9, 10, 20)]
    decisions = by_id(select(sets, NOW, CFG))
    assert deleted(list(decisions.values())) == {sets[i].id for i in (3, 4, 5)}
    assert decisions[sets[0].id].reason == "one of the newest 3 good postgres backups (1 day old)"
    # the third good set is 8 days old but protected by keep_last
    assert decisions[sets[2].id].action == "keep"
    assert decisions[sets[2].id].reason.startswith("one of the newest 3 good postgres backups")
    assert decisions[sets[3].id].reason == "9 days old > 7 days; 3 newer good sets kept"


def test_young_sets_beyond_keep_last_are_kept_by_age() -> None:
    sets = [cand(d) for d in (0.5, 1, 2, 3, 6.5, 7.5)]
    decisions = by_id(select(sets, NOW, CFG))
    assert decisions[sets[3].id].reason == "3 days old <= 7 days"
    assert decisions[sets[4].id].reason == "6 days 12 h old <= 7 days"
    assert deleted(list(decisions.values())) == {sets[5].id}
    assert decisions[sets[5].id].reason == "7 days 12 h old > 7 days; 5 newer good sets kept"


def test_a_series_of_failed_backups_never_deletes_the_last_good_one() -> None:
    failed = [cand(d, status="failed") for d in (1, 2, 3, 4, 5, 6, 8, 9)]
    good = [cand(d) for d in (30, 40, 50, 60)]
    decisions = by_id(select(failed + good, NOW, CFG))
    assert [decisions[g.id].action for g in good] == ["keep", "keep", "keep", "delete"]
    assert decisions[good[3].id].reason == "60 days old > 7 days; 3 newer good sets kept"
    # failed sets older than days go, and say they never count
    assert {failed[6].id, failed[7].id} <= deleted(list(decisions.values()))
    assert decisions[failed[6].id].reason == ("failed backup, 8 days old > 7 days; failed sets never count "
                                              "toward keep_last (0 newer good sets kept)")
    assert decisions[failed[0].id].reason == "failed backup, 1 day old <= 7 days"


@pytest.mark.parametrize("status", ["failed", "incomplete", "damaged"])
def test_bad_sets_never_count_toward_keep_last(status: str) -> None:
    bad = [cand(d, status=status) for d in (1, 2, 3)]
    good = [cand(d) for d in (10, 11, 12, 13)]
    decisions = by_id(select(bad + good, NOW, CFG))
    assert deleted(list(decisions.values())) == {good[3].id}
    assert all(decisions[b.id].action == "keep" for b in bad)
    old_bad = cand(9, status=status)
    decision = by_id(select([old_bad, *good], NOW, CFG))[old_bad.id]
    assert decision.action == "delete"
    assert decision.reason.startswith(f"{status} backup, 9 days old > 7 days; {status} sets never count")


def test_only_one_good_set_and_it_is_ancient() -> None:
    only = cand(400)
    assert select([only], NOW, CFG) == [Decision(only, "keep",
                                                 "one of the newest 3 good postgres backups (400 days old)")]


def test_kinds_are_counted_separately() -> None:
    pg = [cand(d) for d in (10, 11, 12, 13)]
    rd = [cand(d, kind="redis") for d in (10.5, 11.5)]
    decisions = by_id(select(pg + rd, NOW, CFG))
    assert deleted(list(decisions.values())) == {pg[3].id}
    assert decisions[rd[1].id].reason.startswith("one of the newest 3 good redis backups")


def test_safety_backups_have_their_own_rule_and_do_not_protect_regular_ones() -> None:
    safety = [cand(d, type="safety") for d in (5, 29, 31, 45)]
    regular = [cand(d) for d in (10, 11, 12, 13)]
    decisions = by_id(select(safety + regular, NOW, CFG))
    assert decisions[safety[0].id].reason == "one of the newest 1 good postgres safety backups (5 days old)"
    assert decisions[safety[1].id].reason == "29 days old <= 30 days"
    assert decisions[safety[2].id].reason == "31 days old > 30 days; 2 newer good sets kept"
    assert deleted(list(decisions.values())) == {safety[2].id, safety[3].id, regular[3].id}


def test_safety_keep_last_zero_deletes_every_old_safety_backup() -> None:
    cfg = RetentionConfig(days=7, keep_last=3, safety_days=30, safety_keep_last=0)
    only = cand(31, type="safety")
    (decision,) = select([only], NOW, cfg)
    assert decision.action == "delete"
    assert decision.reason == "31 days old > 30 days; 0 newer good sets kept"


def test_exactly_days_old_is_kept_one_second_more_is_deleted() -> None:
    sets = [cand(d) for d in (1, 2, 3)]
    edge = cand(7)
    past = cand(7 + 1 / 86400)
    decisions = by_id(select([*sets, edge, past], NOW, CFG))
    assert decisions[edge.id].reason == "7 days old <= 7 days"
    assert decisions[past.id].reason == "7 days 1 s old > 7 days; 4 newer good sets kept"


def test_created_at_in_the_future_is_kept() -> None:
    sets = [cand(d) for d in (-2, 1, 2, 3, 9)]
    decisions = by_id(select(sets, NOW, CFG))
    assert decisions[sets[0].id].action == "keep"
    assert deleted(list(decisions.values())) == {sets[4].id}


def test_naive_created_at_is_read_as_local_time() -> None:
    naive = (NOW - dt.timedelta(days=20)).astimezone().replace(tzinfo=None)
    sets = [cand(1), cand(2), cand(3), cand(20, created_at=naive)]
    assert deleted(select(sets, NOW, CFG)) == {sets[3].id}


def test_retention_days_setting_moves_the_line() -> None:
    sets = [cand(d) for d in (1, 2, 3, 4, 5, 6)]
    for days, expected in ((1, {sets[3].id, sets[4].id, sets[5].id}), (4, {sets[4].id, sets[5].id}), (6, set())):
        assert deleted(select(sets, NOW, RetentionConfig(days=days, keep_last=3))) == expected


def test_keep_last_one() -> None:
    sets = [cand(d) for d in (30, 40)]
    assert deleted(select(sets, NOW, RetentionConfig(days=7, keep_last=1))) == {sets[1].id}


def test_exhaustively_the_newest_good_are_never_deleted() -> None:
    """Every mix of 6 sets (ages and statuses): the newest keep_last good ones stay, every deleted set is
    older than days, and a set is kept only if it is protected or young."""
    ages = (1, 6, 8, 15, 40, 90)
    for keep_last in (1, 2, 3):
        cfg = RetentionConfig(days=7, keep_last=keep_last)
        for statuses in itertools.product(("ok", "failed", "incomplete"), repeat=len(ages)):
            sets = [cand(a, status=s) for a, s in zip(ages, statuses, strict=True)]
            decisions = by_id(select(sets, NOW, cfg))
            good = [c for c in sets if c.status == "ok"]
            protected = {c.id for c in good[:keep_last]}
            for c in sets:
                d = decisions[c.id]
                if c.id in protected:
                    assert d.action == "keep"
                elif NOW - c.created_at > dt.timedelta(days=7):
                    assert d.action == "delete", (statuses, c)
                else:
                    assert d.action == "keep"
            assert len(decisions) == len(sets)


@pytest.mark.parametrize(("change", "message"), [
    ({"prefix": "evil_"}, "manifest prefix 'evil_' is not 'kkua_backup_'"),
    ({"id": "20240101"}, "manifest id '20240101' is not YYYYMMDD_HHMMSS"),
    ({"manifest": "copy.manifest.json"}, "manifest file copy.manifest.json does not carry the set's name"),
    ({"files": ()}, "manifest names no data file"),
    ({"files": ("../../etc/passwd",)}, "manifest names '../../etc/passwd'"),
    ({"files": ("notes.txt",)}, "manifest names 'notes.txt'"),
    ({"files": ("kkua_backup_20240101_020000.sql.gz",)}, "which is not a kkua_backup_20231221_120000* file"),
    ({"type": "weird"}, "unknown kind/type postgres/weird"),
])
def test_sets_with_foreign_names_are_skipped_never_deleted(change: dict[str, object], message: str) -> None:
    bad = cand(90, **change)
    assert name_problem(bad) is not None
    (decision,) = select([bad], NOW, CFG)
    assert decision.action == "skip"
    assert message in decision.reason
    assert decision.reason.endswith("left alone")


def test_name_problem_accepts_what_the_tool_writes() -> None:
    set_id = "20240115_030000"
    redis = cand(1, kind="redis", id=set_id, files=(f"redis_backup_{set_id}.rdb.gz", f"redis_backup_{set_id}.aof.gz",
                                                    f"redis_backup_{set_id}_memory.json.gz",
                                                    f"redis_backup_{set_id}_config.conf.gz"),
                 manifest=f"redis_backup_{set_id}.manifest.json")
    assert name_problem(redis) is None
    assert name_problem(cand(1)) is None
    assert name_problem(cand(1, type="safety")) is None
    twice = cand(1)
    assert "twice" in (name_problem(Candidate(**{**twice.__dict__, "files": twice.files * 2})) or "")
    partial = cand(1)
    assert name_problem(Candidate(**{**partial.__dict__, "files": (partial.files[0] + ".partial",)})) is not None


def test_a_disk_problem_skips_even_an_old_set_and_it_does_not_count_as_good() -> None:
    linked = cand(1, problem="x.sql.gz is a symlink; left alone")
    others = [cand(d) for d in (20, 21, 22, 23)]
    decisions = by_id(select([linked, *others], NOW, CFG))
    assert decisions[linked.id] == Decision(linked, "skip", "x.sql.gz is a symlink; left alone")
    assert deleted(list(decisions.values())) == {others[3].id}


@pytest.mark.parametrize(("seconds", "text", "precise"), [
    (0, "0 s", "0 s"), (40, "40 s", "40 s"), (60, "1 min", "1 min"), (3723, "1 h 2 min", "1 h 2 min"),
    (86400, "1 day", "1 day"), (9 * 86400 + 61, "9 days", "9 days 1 min"),
    (7 * 86400 + 3 * 3600 + 59, "7 days 3 h", "7 days 3 h"), (7 * 86400 + 60, "7 days", "7 days 1 min"),
    (2 * 86400 + 5, "2 days", "2 days 5 s"), (5 * 3600 + 7, "5 h", "5 h 7 s"), (-5, "0 s", "0 s"),
])
def test_age_text(seconds: int, text: str, precise: str) -> None:
    assert age_text(dt.timedelta(seconds=seconds)) == text
    assert age_text(dt.timedelta(seconds=seconds), precise=True) == precise


def test_ages_just_past_the_limit_are_precise_and_others_round() -> None:
    sets = [cand(d) for d in (1, 2, 3)]
    just = cand(7 + 30 / 86400)
    later = cand(9 + 100 / 86400)
    decisions = by_id(select([*sets, just, later], NOW, CFG))
    assert decisions[just.id].reason == "7 days 30 s old > 7 days; 3 newer good sets kept"
    assert decisions[later.id].reason == "9 days old > 7 days; 3 newer good sets kept"


def test_partials_older_than_a_day_go() -> None:
    old = Partial("kkua_backup_20240101_020000.sql.gz.partial", NOW - dt.timedelta(days=2), 10)
    young = Partial("kkua_backup_20240320_020000.sql.gz.partial", NOW - dt.timedelta(hours=10), 10)
    result = select_partials([old, young], NOW)
    assert result[0] == (old, "delete", "leftover partial file of an interrupted run, 2 days old > 1 day")
    assert result[1][1] == "keep"


@pytest.mark.parametrize(("kind", "name", "ok"), [
    ("postgres", "kkua_backup_20240101_020000.sql.gz.partial", True),
    ("postgres", "safety_backup_before_restore_20240101_020000.sql.gz.partial", True),
    ("postgres", "kkua_backup_20240101_020000.manifest.json.partial", True),
    ("redis", "redis_backup_20240101_020000_memory.json.gz.partial", True),
    ("redis", "kkua_backup_20240101_020000.sql.gz.partial", False),
    ("postgres", "notes.txt.partial", False),
    ("postgres", "kkua_backup_20240101_020000.sql.gz", False),
    ("postgres", "kkua_backup_2024.partial", False),
])
def test_partial_names(kind: str, name: str, ok: bool) -> None:
    assert partial_name_ok(kind, name) is ok


def test_a_future_dated_set_does_not_count_toward_keep_last() -> None:
    # With a wrong clock a set dated next month would otherwise stand in for the newest good set and
    # let the real newest one (10 days old) be deleted.
    sets = [cand(-30), cand(10), cand(20)]
    decisions = by_id(select(sets, NOW, RetentionConfig(days=7, keep_last=1)))
    assert decisions[sets[0].id].action == "keep"
    assert "not counted toward keep_last" in decisions[sets[0].id].reason
    assert decisions[sets[1].id].action == "keep"
    assert deleted(list(decisions.values())) == {sets[2].id}
