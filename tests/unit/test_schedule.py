"""Schedules against the oracle: `systemd-analyze calendar` on this machine must print the same normalized
form and the same next elapses as kkua_backupd.schedule, for every expression, zone and base time here."""

from __future__ import annotations

import datetime as dt
import functools
import os
import random
import shutil
import subprocess
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from kkua_backupd import schedule
from kkua_backupd.config import ScheduleConfig, load_config
from kkua_backupd.errors import ConfigError

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(SYSTEMD_ANALYZE is None,
                                   reason="systemd-analyze is not installed: it is the oracle these tests compare with")

ITERATIONS = 12
UTC = dt.UTC

EXPRESSIONS = [
    # the defaults and the shorthands
    "*-*-* 02:00:00", "*-*-* 03:00:00", "Sun *-*-* 04:00:00", "minutely", "hourly", "daily", "weekly", "monthly",
    "yearly", "annually", "quarterly", "semiannually", "semi-annually", "Daily",
    # weekdays: lists, ranges, both range spellings, long names, trailing comma
    "Mon..Fri *-*-* 02:00", "Mon-Fri 09:30", "Sat,Sun 10:00", "Mon,Wed,Fri..Sun *-*-* 12:00", "Tue..Thu",
    "Monday *-*-* 1:2:3", "Fri, 17:00", "Fri *-*-13", "Fri *-*-13 13:13",
    # steps and ranges in every field
    "*:0/15", "*:00/15:30", "*:*:0/10", "*-*-* 8..18/2:00", "*-*-* 1..4:15,45", "*-*-1/2", "*-*-01/11",
    "*-1/3-1 00:00", "*-02..04-* 06:00", "*-*-10..20 06:00", "*-*-1..31/7", "*-1..3,7..9-1 00:00",
    "Mon-Wed,Fri 1..10/2-5 1:2:3",
    # lists of hours and minutes
    "*-*-* 02,14:00", "*-*-* 02:00,30", "*-*-* 02:00,30:00", "*-*-* 01..03:00/20:00", "*:30",
    # days from the end of the month
    "*-02~01", "*-*~07/1", "Mon *-05~07/1", "*-*~01", "*-*~1..3", "*-*~03/2 12:00", "*-*~28",
    # leap days, impossible days, explicit years and dates
    "*-02-29", "*-02-29 12:00", "Mon *-02-29", "*-04-31", "*-*-31", "*-*-30 23:00", "12-25", "*-12-25 18:00",
    "2027-*-* 00:00", "2026..2028-01-01", "26-07-01", "2026-12-31 23:59:59", "2025-01-01", "2199-12-31 23:00",
    "@1800000000",
    # seconds, with fractions
    "*-*-* *:*:*", "*-*-* 12:00:00.5", "*:*:01.25/7.5", "*-*-* 23:59:59.999999", "1:2:3.25/0.5",
    # daylight-saving corners in local time
    "*-*-* 02:30:00", "*-*-* 02:00:00/20", "*-*-* *:30:00", "*-*-* 01:30", "*-*-* 03:00",
    # expressions with their own zone
    "Sun *-*-* 04:00:00 UTC", "*-*-* 02:00:00 Europe/Berlin", "*-*-* 02:30:00 Europe/Berlin",
    "Mon..Fri 08:00 America/New_York", "*-*-* 01:30 America/New_York", "*-*-* 00:00:00 Asia/Seoul",
    "*-*-* 02:00 Etc/UTC", "*-*-* 02:00 utc",
]


def _epoch(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp())


# Base times for every zone, then per zone the moments around its daylight-saving changes.
COMMON_BASES = ["2026-01-15T10:00:00+00:00", "2028-02-28T12:00:00+00:00", "2026-12-31T23:30:00+00:00"]
ZONES: dict[str, list[str]] = {
    "UTC": ["2026-03-28T12:00:00+00:00", "2026-10-25T01:10:00+00:00"],
    "Asia/Seoul": ["2026-06-30T15:00:00+00:00"],
    # 2026-03-29 02:00 CET does not exist; 02:00-03:00 on 2026-10-25 happens twice
    "Europe/Berlin": ["2026-03-28T12:00:00+00:00", "2026-03-29T00:30:00+00:00", "2026-10-24T12:00:00+00:00",
                      "2026-10-25T00:30:00+00:00", "2026-10-25T01:10:00+00:00"],
    # 2026-03-08 02:00 EST does not exist; 01:00-02:00 on 2026-11-01 happens twice
    "America/New_York": ["2026-03-07T12:00:00+00:00", "2026-03-08T06:30:00+00:00", "2026-10-24T12:00:00+00:00",
                         "2026-11-01T05:10:00+00:00", "2026-11-01T06:10:00+00:00"],
    # half-hour summer time: 2026-10-04 02:00 -> 02:30, 2026-04-05 02:00 -> 01:30
    "Australia/Lord_Howe": ["2026-10-03T15:20:00+00:00", "2026-04-04T14:50:00+00:00"],
    # changes at midnight: 2026-09-06 00:00 -> 01:00, 2026-04-05 00:00 -> 2026-04-04 23:00
    "America/Santiago": ["2026-09-06T03:10:00+00:00", "2026-04-05T02:10:00+00:00"],
    # "negative" summer time (winter is the DST period in tzdata): 2026-03-29 01:00 GMT -> 02:00 IST
    "Europe/Dublin": ["2026-03-29T00:38:37+00:00", "2026-10-25T00:40:00+00:00"],
}
CASES = [(zone, [_epoch(b) for b in COMMON_BASES + extra]) for zone, extra in ZONES.items()]


def _parse_stamp(line: str) -> int:
    # "Sun 2026-03-01 01:00:00 UTC" (systemd prints whole seconds)
    _, value = line.split(": ", 1)
    parts = value.split()
    assert parts[-1] == "UTC", line
    moment = dt.datetime.fromisoformat(f"{parts[1]}T{parts[2]}+00:00")
    return int(moment.timestamp())


GAVE_UP = "systemd gave up"


@functools.cache
def _systemd_batch(zone: str, base: int, expressions: tuple[str, ...]) -> dict[str, tuple[str, list[int]]]:
    """Run systemd-analyze once for many valid expressions; per expression its normalized form and elapses
    (in seconds since the epoch, as systemd prints whole seconds)."""
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "calendar", f"--iterations={ITERATIONS}", f"--base-time=@{base}", "--", *expressions],
        env={**os.environ, "TZ": zone, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
        capture_output=True, text=True, check=False, timeout=120)
    # systemd gives up on a few expressions with "Infinite loop in calendar calculation" (its 1000-step
    # safety valve) and then prints nothing for them.
    failed = prefix = "Failed to determine next elapse for '"
    gave_up = {line[len(prefix):].rsplit("': ", 1)[0] for line in proc.stderr.splitlines() if line.startswith(failed)}
    noise = ("Infinite loop in calendar calculation:", failed)
    assert all(line.startswith(noise) for line in proc.stderr.splitlines()), proc.stderr
    assert proc.returncode == 0 or gave_up, proc.stderr
    blocks: list[tuple[str, list[int]]] = []
    lines = [line.strip() for line in proc.stdout.splitlines()]
    pending_original = False
    for i, line in enumerate(lines):
        if line.startswith("Original form:"):
            pending_original = True
            continue
        if line.startswith("Normalized form:"):
            blocks.append((line.split(": ", 1)[1], []))
            pending_original = False
            continue
        assert not pending_original, proc.stdout
        if line == "Next elapse: never":
            continue
        if line.startswith(("Next elapse:", "Iter. #")):
            follower = lines[i + 1] if i + 1 < len(lines) else ""
            blocks[-1][1].append(_parse_stamp(follower if follower.startswith("(in UTC):") else line))
    printed = [e for e in expressions if e not in gave_up]
    assert len(blocks) == len(printed), (len(blocks), len(printed), proc.stderr)
    results = dict(zip(printed, blocks, strict=True))
    results.update({e: (GAVE_UP, []) for e in gave_up})
    return results


def _systemd(zone: str, base: int, expr: str) -> tuple[str, list[int]]:
    return _systemd_batch(zone, base, tuple(EXPRESSIONS))[expr]


def _ours(zone: str, base: int, expr: str) -> tuple[str, list[int]]:
    after = dt.datetime.fromtimestamp(base, UTC)
    elapses = schedule.next_elapses(expr, after, ITERATIONS, timezone=zone)
    for moment in elapses:
        assert moment.tzinfo is not None
    # systemd prints whole seconds, rounding down
    return schedule.normalized(expr, zone), [int(m.timestamp() // 1) for m in elapses]


def _show(stamps: list[int]) -> list[str]:
    return [dt.datetime.fromtimestamp(s, UTC).strftime("%Y-%m-%d %H:%M:%S") for s in stamps]


@needs_systemd
@pytest.mark.parametrize(("zone", "bases"), CASES, ids=[zone for zone, _ in CASES])
@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_same_elapses_as_systemd(expr: str, zone: str, bases: list[int]) -> None:
    mismatches = []
    for base in bases:
        theirs = _systemd(zone, base, expr)
        ours = _ours(zone, base, expr)
        if theirs[0] == GAVE_UP and len(ours[1]) < ITERATIONS:
            continue  # we gave up too (next_elapse returns None, as a timer would not fire)
        if ours != theirs:
            mismatches.append(f"base {_show([base])[0]} UTC: systemd {theirs[0]!r} {_show(theirs[1])}\n"
                              f"{' ' * 30}ours    {ours[0]!r} {_show(ours[1])}")
    assert not mismatches, f"{expr!r} in TZ={zone}:\n" + "\n".join(mismatches)


@needs_systemd
@pytest.mark.parametrize(("zone", "expressions"), [
    ("Europe/Berlin", ("*-*-* 02:00 CET", "*-*-* 02:30:00 CEST", "*:0/20 CET", "Sun *-*-* 03:00 CEST")),
    ("America/New_York", ("*-*-* 01:30 EDT", "*-*-* 01:30 EST")),
    ("Asia/Seoul", ("*-*-* 02:00 KST", "*:0/15 KST")),
])
def test_local_zone_abbreviations(zone: str, expressions: tuple[str, ...]) -> None:
    """An expression may end in the local zone's standard or summer abbreviation (systemd then forces
    mktime's daylight-saving flag); "CEST" is refused elsewhere, as systemd refuses it."""
    bases = dict(CASES)[zone]
    for base in bases:
        theirs = _systemd_batch(zone, base, expressions)
        for expr in expressions:
            ours = _ours(zone, base, expr)
            if theirs[expr][0] == GAVE_UP and len(ours[1]) < ITERATIONS:
                continue
            assert ours == theirs[expr], f"{expr!r} in TZ={zone} from {_show([base])[0]} UTC"
    with pytest.raises(ValueError, match="unknown time zone 'CEST'"):
        schedule.validate("*-*-* 02:30:00 CEST", "Asia/Seoul")


def _random_expression(rnd: random.Random) -> str:
    def item(low: int, high: int) -> str:
        a = rnd.randint(low, high)
        b = rnd.randint(a, high)
        return rnd.choice([f"{a:02d}", str(a), f"{a}..{b}", f"{a}/{rnd.randint(1, max(1, (high - low) // 2))}",
                           f"{a}..{b}/{rnd.randint(1, 5)}"])

    def field(low: int, high: int, star: float = 0.5) -> str:
        return "*" if rnd.random() < star else ",".join(item(low, high) for _ in range(rnd.randint(1, 3)))

    parts = []
    if rnd.random() < 0.3:
        a = rnd.randint(0, 6)
        b = rnd.randint(a, 6)
        days = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
        parts.append(rnd.choice([days[a], f"{days[a]}..{days[b]}", f"{days[a]},{days[b]}"]))
    if rnd.random() < 0.6:
        sep = "~" if rnd.random() < 0.2 else "-"
        year = "*" if rnd.random() < 0.8 else field(2026, 2030, 0)
        parts.append(f"{year}-{field(1, 12)}{sep}{field(1, 28 if sep == '~' else 31)}")
    seconds = f":{field(0, 59)}" if rnd.random() < 0.5 else ""
    parts.append(f"{field(0, 23, 0.3)}:{field(0, 59, 0.3)}{seconds}")
    return " ".join(parts)


def _transitions(zone: str, year: int) -> list[int]:
    tz = ZoneInfo(zone)
    found = []
    t = _epoch(f"{year}-01-01T00:00:00+00:00")
    before = dt.datetime.fromtimestamp(t, tz).utcoffset()
    while len(found) < 2 and t < _epoch(f"{year + 1}-01-01T00:00:00+00:00"):
        t += 1800
        now = dt.datetime.fromtimestamp(t, tz).utcoffset()
        if now != before:
            found.append(t)
            before = now
    return found


@needs_systemd
@pytest.mark.parametrize(("zone", "year"), [("Europe/London", 2026), ("Africa/Casablanca", 2026),
                                            ("Pacific/Chatham", 2026), ("Pacific/Apia", 2011),
                                            ("Asia/Beirut", 2026), ("America/St_Johns", 2026)])
def test_random_expressions_agree_around_zone_changes(zone: str, year: int) -> None:
    """Expressions nobody thought of, near each change of the zone's offset (Apia skipped 2011-12-30)."""
    rnd = random.Random(f"{zone}{year}")
    expressions: list[str] = []
    while len(expressions) < 25:
        expr = _random_expression(rnd)
        try:
            schedule.validate(expr, "UTC")
        except ValueError:
            continue
        expressions.append(expr)
    checked = 0
    for change in _transitions(zone, year):
        for base in (change - rnd.randint(60, 5400), change + rnd.randint(0, 3600)):
            theirs = _systemd_batch(zone, base, tuple(expressions))
            for expr in expressions:
                ours = _ours(zone, base, expr)
                if theirs[expr][0] == GAVE_UP and len(ours[1]) < ITERATIONS:
                    continue
                assert ours == theirs[expr], (f"{expr!r} in TZ={zone} from {_show([base])[0]} UTC:\n"
                                              f"systemd {_show(theirs[expr][1])}\nours    {_show(ours[1])}")
                checked += 1
    assert checked >= 50


@needs_systemd
def test_the_comparison_covers_real_elapses() -> None:
    """Guard against a vacuous oracle: most expressions must elapse, and DST days must be among them."""
    base = _epoch("2026-10-24T12:00:00+00:00")
    _, berlin = _systemd("Europe/Berlin", base, "*-*-* 02:30:00")
    assert _show(berlin)[:2] == ["2026-10-25 00:30:00", "2026-10-26 01:30:00"]
    elapsing = [e for e in EXPRESSIONS if _systemd("UTC", _epoch(COMMON_BASES[0]), e)[1]]
    assert len(elapsing) > len(EXPRESSIONS) - 6


def test_dst_days_in_berlin() -> None:
    """The answers systemd gives (checked above) spelled out: a skipped hour is skipped, a repeated hour
    fires once, in summer time."""
    berlin = "Europe/Berlin"
    spring = schedule.next_elapses("*-*-* 02:30:00", dt.datetime(2026, 3, 28, 12, tzinfo=UTC), 2, berlin)
    assert [m.isoformat() for m in spring] == ["2026-03-30T02:30:00+02:00", "2026-03-31T02:30:00+02:00"]
    autumn = schedule.next_elapses("*-*-* 02:30:00", dt.datetime(2026, 10, 24, 12, tzinfo=UTC), 2, berlin)
    assert [m.isoformat() for m in autumn] == ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    hourly = schedule.next_elapses("*:30", dt.datetime(2026, 10, 25, 0, 10, tzinfo=UTC), 3, berlin)
    assert [m.isoformat() for m in hourly] == ["2026-10-25T02:30:00+02:00", "2026-10-25T03:30:00+01:00",
                                               "2026-10-25T04:30:00+01:00"]


INVALID = [
    "*-*-* 25:00", "Funday", "", "*/15", "*:*/15", "Sat..Mon", "*-*-32", "*-13-01", "*-*~29", "2200-01-01",
    "1969-01-01", "*-*-* 12:60", "*-*-* 12:00:60", "Mon..", "Mon.Fri", "*-*-* 02:00 Mars/Olympus", " daily",
    "daily ", "*-*-* 00:00:00.", "1,2,3..", "*:0/0", "*-*-1/31", "*-*-* 02:00:00 02:00", "Mon *-*~02-01",
    "*-*-*-*", "02:00:00:00", "Mond 02:00", "2026-1-1 Mon",
]


@needs_systemd
@pytest.mark.parametrize("expr", INVALID)
def test_invalid_expressions_are_refused_by_both(expr: str) -> None:
    proc = subprocess.run([SYSTEMD_ANALYZE or "systemd-analyze", "calendar", "--", expr],
                          env={**os.environ, "TZ": "UTC"}, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode != 0 and "Failed to parse calendar specification" in proc.stderr, proc.stdout
    with pytest.raises(ValueError, match="invalid calendar expression") as caught:
        schedule.validate(expr, "UTC")
    message = str(caught.value)
    assert repr(expr) in message
    assert '"*-*-* 02:00:00"' in message and "systemd-analyze calendar" in message


@pytest.mark.parametrize(("expr", "reason"), [
    ("*-*-* 25:00", "hour 25 is out of range 0..23"),
    ("Funday", "'Funday' is not a weekday"),
    ("", "it is empty"),
    ("*:*/15", "is cron syntax; systemd writes a step from a start: 0/15"),
    ("Sat..Mon", "runs backwards"),
    ("*-*-* 02:00 Mars/Olympus", "'Mars/Olympus'"),
    ("*-*~29", "out of range 1..28"),
    ("2200-01-01", "year 2200 is out of range 1970..2199"),
])
def test_messages_say_what_is_wrong(expr: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        schedule.validate(expr)
    assert reason in str(caught.value)


def test_timezones() -> None:
    with pytest.raises(ValueError, match=r"unknown time zone 'Mars/Olympus'.*Asia/Seoul"):
        schedule.validate("daily", "Mars/Olympus")
    with pytest.raises(ValueError, match="unknown time zone"):
        schedule.next_elapse("daily", dt.datetime(2026, 1, 1, tzinfo=UTC), "../etc/passwd")
    after = dt.datetime(2026, 1, 1, tzinfo=UTC)
    seoul = schedule.next_elapse("*-*-* 02:00:00", after, "Asia/Seoul")
    assert seoul is not None and seoul.isoformat() == "2026-01-02T02:00:00+09:00"
    # an expression's own zone wins over the configured one; the result is shown in the configured zone
    own = schedule.next_elapse("*-*-* 02:00:00 Europe/Berlin", after, "Asia/Seoul")
    assert own is not None and own.isoformat() == "2026-01-01T10:00:00+09:00"
    assert schedule.for_systemd("*-*-* 02:00:00", "Asia/Seoul") == "*-*-* 02:00:00 Asia/Seoul"
    assert schedule.for_systemd("*-*-* 02:00:00 UTC", "Asia/Seoul") == "*-*-* 02:00:00 UTC"
    assert schedule.for_systemd("daily", None) == "daily"


def test_local_time_follows_tz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    nxt = schedule.next_elapse("*-*-* 02:00:00", dt.datetime(2026, 1, 1, tzinfo=UTC))
    assert nxt is not None and nxt.isoformat() == "2026-01-01T02:00:00-05:00"


def test_strictly_after_and_never() -> None:
    at = dt.datetime(2026, 1, 1, 2, 0, 0, tzinfo=UTC)
    nxt = schedule.next_elapse("*-*-* 02:00:00", at, "UTC")
    assert nxt == dt.datetime(2026, 1, 2, 2, 0, 0, tzinfo=UTC)
    assert schedule.next_elapse("2025-01-01", at, "UTC") is None
    assert schedule.next_elapses("2026-01-02 02:00", at, 5, "UTC") == [dt.datetime(2026, 1, 2, 2, tzinfo=UTC)]
    with pytest.raises(ValueError, match="has no time zone"):
        schedule.next_elapse("daily", dt.datetime(2026, 1, 1), "UTC")


def test_randomized_delay_is_stable_and_bounded() -> None:
    when = dt.datetime(2026, 1, 1, 2, tzinfo=UTC)
    delays = {schedule.randomized(when + dt.timedelta(days=i), 3600, "postgres") - (when + dt.timedelta(days=i))
              for i in range(200)}
    assert all(dt.timedelta(0) <= d < dt.timedelta(hours=1) for d in delays)
    assert len(delays) > 150  # spread out, not one constant
    assert schedule.randomized(when, 3600, "postgres") == schedule.randomized(when, 3600, "postgres")
    assert schedule.randomized(when, 3600, "postgres") != schedule.randomized(when, 3600, "redis")
    assert schedule.randomized(when, 0, "postgres") == when


def test_config_checks_schedules_and_zone(tmp_path: Path) -> None:
    assert ScheduleConfig(redis="Mon..Fri *-*-* 03:30", timezone="Asia/Seoul").redis == "Mon..Fri *-*-* 03:30"
    path = tmp_path / "config.toml"
    path.write_text('[schedule]\nredis = "*-*-* 25:00"\nretention = "Funday"\ntimezone = "Mars/Olympus"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ={})
    problems = caught.value.problems
    assert problems[0].startswith("schedule.timezone: unknown time zone 'Mars/Olympus'")
    assert problems[1].startswith("schedule.redis: invalid calendar expression '*-*-* 25:00': hour 25 is out of "
                                  "range 0..23")
    assert problems[2].startswith("schedule.retention: invalid calendar expression 'Funday': 'Funday' is not "
                                  "a weekday")
    assert all(problem.endswith(f"({path})") for problem in problems)
    assert len(problems) == 3
    assert caught.value.exit_code == 2
