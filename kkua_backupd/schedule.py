"""Schedules in systemd `OnCalendar` syntax: validation, normalized form, next elapses, randomized delay.

The daemon must fire at exactly the instants a systemd timer with the same expression would, so this
module follows the calendar arithmetic of systemd 252.39 as Debian 12 ships it (src/shared/calendarspec.c,
with its backported fixes) step by step: the same parser and normalization (so `normalized()` prints what
`systemd-analyze calendar` prints as "Normalized form"), and the same search for the next elapse, including
how glibc's mktime() resolves wall-clock times that a daylight-saving change skips or repeats.
`systemd-analyze calendar` is the test oracle (tests/unit/test_schedule.py). The `oncalendar` package,
chosen first, parses the same syntax but has no normalized form, no fractional seconds and no error
messages, and disagrees with systemd around DST changes, so it is not used here (see docs/schedules.md,
"Why not the oncalendar package").

Expressions without their own zone are read in the configured `[schedule] timezone` (an IANA name), else
in the local time zone, as systemd reads them in the system's local time.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "for_systemd",
    "next_elapse",
    "next_elapses",
    "normalized",
    "randomized",
    "resolve_zone",
    "validate",
]

USEC_PER_SEC = 1_000_000
MIN_YEAR = 1970
MAX_YEAR = 2199
BITS_WEEKDAYS = 127
# systemd's limits: at most this many comma-separated items per field, and this many search steps.
_COMPONENTS_MAX = 240
_MAX_ITERATIONS = 1000
_INT_MAX = 2**31 - 1
_ZONEINFO_DIR = Path("/usr/share/zoneinfo")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()
_SECOND = dt.timedelta(seconds=1)
# Offsets are compared two days either side of a wall-clock time: zones do not change twice that fast.
_NEAR = 172800

_EXAMPLES = ('e.g. "*-*-* 02:00:00" (daily at 02:00), "Mon..Fri *-*-* 03:30", "Sun *-*-* 04:00:00", '
             '"*:0/15" (every 15 minutes) or "*-*-* 02:00:00 Europe/Berlin"; '
             'check with `systemd-analyze calendar EXPR`')

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAYS_LONG = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
# systemd tries the long name before the short one.
_DAY_NAMES = tuple((name, nr) for nr in range(7) for name in (_DAYS_LONG[nr], _DAYS[nr]))


class _Invalid(ValueError):
    """Raised inside the parser with the precise reason; `validate` adds the expression and examples."""


@dataclass(frozen=True)
class _Component:
    """One comma-separated item of a field: `start[..stop][/repeat]` (stop -1 when absent)."""

    start: int
    stop: int = -1
    repeat: int = 0


Chain = tuple[_Component, ...] | None  # None is "*"


@dataclass(frozen=True)
class _Spec:
    """A parsed, normalized expression (systemd's CalendarSpec); seconds are held in microseconds."""

    weekdays: int = -1
    year: Chain = None
    month: Chain = None
    day: Chain = None
    hour: Chain = None
    minute: Chain = None
    usec: Chain = None
    end_of_month: bool = False
    utc: bool = False
    timezone: str | None = None
    dst: int = -1  # 0 or 1 when the expression ends in the local zone's standard or summer abbreviation


# ---------------------------------------------------------------------------------------------------------
# time zones


def _local_zone() -> ZoneInfo:
    """The process's local zone the way glibc finds it: $TZ (a zone name or file), else /etc/localtime."""
    tz = os.environ.get("TZ")
    if tz is not None:
        name = tz[1:] if tz.startswith(":") else tz
        try:
            if name.startswith("/"):
                with open(name, "rb") as fh:
                    return ZoneInfo.from_file(fh, key=name)
            if name:
                return ZoneInfo(name)
        except (OSError, ValueError, ZoneInfoNotFoundError):
            pass  # a POSIX rule string or a broken name: glibc would fall back too
    try:
        with open("/etc/localtime", "rb") as fh:
            return ZoneInfo.from_file(fh, key="localtime")
    except (OSError, ValueError):
        return ZoneInfo("UTC")


def _zone_name_valid(name: str) -> bool:
    """systemd's timezone_is_valid(): a plain name of a TZif file under /usr/share/zoneinfo."""
    if not name:
        return False
    if name == "UTC":
        return True
    if name.startswith("/") or name.endswith("/") or "//" in name:
        return False
    if any(not (ch.isascii() and (ch.isalnum() or ch in "-_+/")) for ch in name):
        return False
    try:
        with (_ZONEINFO_DIR / name).open("rb") as fh:
            return fh.read(4) == b"TZif"
    except OSError:
        return False


def resolve_zone(timezone: str | None) -> ZoneInfo:
    """The zone for expressions without their own: the IANA `timezone` if given, else local time.

    Raises ValueError naming the zone when it is not a valid IANA name installed on this machine.
    """
    if timezone is None:
        return _local_zone()
    if not _zone_name_valid(timezone):
        raise ValueError(f"unknown time zone {timezone!r}: use an IANA name installed under {_ZONEINFO_DIR}, "
                         f'e.g. "Asia/Seoul", "Europe/Berlin" or "UTC" (see `timedatectl list-timezones`)')
    return ZoneInfo(timezone)


def _tznames(zone: ZoneInfo) -> tuple[str, str]:
    """glibc's tzname[0] and tzname[1] for `zone`: its standard and its summer-time abbreviation."""
    year = dt.datetime.now(dt.UTC).year
    std = dst = ""
    for month in (1, 7):
        moment = dt.datetime(year, month, 1, 12, tzinfo=dt.UTC).astimezone(zone)
        if moment.dst():
            dst = moment.tzname() or ""
        else:
            std = moment.tzname() or ""
    return std, dst or std


# ---------------------------------------------------------------------------------------------------------
# parser (systemd's calendar_spec_from_string)


class _Cursor:
    """The text being parsed and the position reached."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < len(self.text) else ""

    def skip_spaces(self) -> None:
        while self.peek() == " ":
            self.pos += 1


def _parse_weekdays(cur: _Cursor) -> int:
    bits = 0
    low = -1
    first = True
    while True:
        rest = cur.text[cur.pos:]
        found = next(((name, nr) for name, nr in _DAY_NAMES if rest[:len(name)].lower() == name.lower()), None)
        if found is None:
            if first:
                return bits
            raise _Invalid(f"{rest.split(' ')[0] or 'nothing'!r} is not a weekday (Mon, Tue, ... Sun)")
        name, nr = found
        after = rest[len(name):len(name) + 1]
        if after not in ("", "-", ".", ",", " "):
            word = rest.split(" ")[0]
            raise _Invalid(f"{word!r} is not a weekday; write Mon..Sun (or Monday..Sunday), ranges as "
                           f"Mon..Fri and lists as Mon,Wed,Fri")
        bits |= 1 << nr
        if low >= 0:
            if low > nr:
                raise _Invalid(f"the weekday range ending in {name} runs backwards; write it from Monday "
                               f"towards Sunday (e.g. Fri..Sun or Mon,Sat,Sun), wrapping around is not allowed")
            for j in range(low + 1, nr):
                bits |= 1 << j
        cur.pos += len(name)
        ch = cur.peek()
        if ch == "":
            return bits
        if ch == " ":
            cur.skip_spaces()
            return bits
        if ch == ".":
            if low >= 0 or cur.peek(1) != ".":
                raise _Invalid("a weekday range is written Mon..Fri (two dots), and only one range per item")
            low = nr
            cur.pos += 2
        elif ch == "-":
            if low >= 0:
                raise _Invalid("only one weekday range per item (write Mon..Wed,Fri..Sun)")
            low = nr
            cur.pos += 1
        elif ch == ",":
            low = -1
            cur.pos += 1
        if cur.peek() in ("", " "):
            cur.skip_spaces()
            if low >= 0:
                raise _Invalid("a weekday range must have an end (Mon..Fri)")
            return bits
        first = False


def _weekday(word: str) -> int | None:
    """The number of a weekday name (Mon = 0), or None."""
    return next((nr for name, nr in _DAY_NAMES if word.lower() == name.lower()), None)


def _parse_number(cur: _Cursor, usec: bool, what: str) -> int:
    start = cur.pos
    while cur.peek().isascii() and cur.peek().isdigit():
        cur.pos += 1
    if cur.pos == start:
        got = cur.text[start:start + 1] or "the end"
        raise _Invalid(f"expected a number in the {what} field, found {got!r}")
    value = int(cur.text[start:cur.pos])
    if usec:
        value *= USEC_PER_SEC
        # One "." is a decimal point, ".." a range.
        if cur.peek() == "." and cur.peek(1) != ".":
            cur.pos += 1
            digits = ""
            while cur.peek().isascii() and cur.peek().isdigit():
                digits += cur.peek()
                cur.pos += 1
            if not digits:
                raise _Invalid("a decimal point in the seconds must be followed by digits (e.g. 00:00:05.5)")
            fraction = int((digits[:6]).ljust(6, "0"))
            if len(digits) > 6 and digits[6] in "56789":
                fraction += 1  # systemd rounds on the seventh digit
            value += fraction
    if value > _INT_MAX:
        raise _Invalid(f"the number {cur.text[start:cur.pos]} in the {what} field is too large")
    return value


def _parse_components(cur: _Cursor, usec: bool, what: str) -> list[_Component]:
    items: list[_Component] = []
    while True:
        if len(items) > _COMPONENTS_MAX:
            raise _Invalid(f"the {what} field lists more than {_COMPONENTS_MAX} items")
        start = _parse_number(cur, usec, what)
        stop, repeat = -1, 0
        if cur.peek() == "." and cur.peek(1) == ".":
            cur.pos += 2
            stop = _parse_number(cur, usec, what)
            repeat = USEC_PER_SEC if usec else 1
        if cur.peek() == "/":
            cur.pos += 1
            repeat = _parse_number(cur, usec, what)
            if repeat == 0:
                raise _Invalid(f"a repetition of 0 in the {what} field never advances; use /1 or more")
        elif usec and stop >= 0 and start + repeat > stop:
            raise _Invalid("a seconds range shorter than one second needs an explicit step (e.g. 00:00:01..01.5/0.5)")
        if cur.peek() not in ("", " ", ",", "-", "~", ":"):
            raise _Invalid(f"unexpected {cur.peek()!r} in the {what} field (items are N, A..B, N/STEP or "
                           f"A..B/STEP, separated by commas; \"*\" cannot be combined with them)")
        items.append(_Component(start, stop, repeat))
        if cur.peek() != ",":
            return items
        cur.pos += 1


def _parse_chain(cur: _Cursor, usec: bool, what: str) -> Chain:
    if cur.peek() == "*":
        cur.pos += 1
        if cur.peek() == "/":
            step = cur.text[cur.pos + 1:].split(":")[0].split(" ")[0] or "N"
            raise _Invalid(f"\"*/{step}\" is cron syntax; systemd writes a step from a start: 0/{step} "
                           f"(e.g. *:0/15 for every 15 minutes)")
        return (_Component(0, -1, USEC_PER_SEC),) if usec else None
    return tuple(_parse_components(cur, usec, what))


def _const(value: int) -> Chain:
    return (_Component(value),)


_SPECIALS: dict[str, dict[str, object]] = {
    "minutely": {"usec": _const(0)},
    "hourly": {"minute": _const(0), "usec": _const(0)},
    "daily": {"hour": _const(0), "minute": _const(0), "usec": _const(0)},
    "monthly": {"day": _const(1), "hour": _const(0), "minute": _const(0), "usec": _const(0)},
    "weekly": {"weekdays": 1, "hour": _const(0), "minute": _const(0), "usec": _const(0)},
    "yearly": {"month": _const(1), "day": _const(1), "hour": _const(0), "minute": _const(0), "usec": _const(0)},
    "quarterly": {"month": tuple(_Component(m) for m in (10, 7, 4, 1)), "day": _const(1), "hour": _const(0),
                  "minute": _const(0), "usec": _const(0)},
    "semiannually": {"month": (_Component(7), _Component(1)), "day": _const(1), "hour": _const(0),
                     "minute": _const(0), "usec": _const(0)},
}
for _alias, _name in (("annually", "yearly"), ("anually", "yearly"), ("biannually", "semiannually"),
                      ("bi-annually", "semiannually"), ("semi-annually", "semiannually")):
    _SPECIALS[_alias] = _SPECIALS[_name]


def _gmtime_fields(seconds: int) -> dict[str, object]:
    moment = _EPOCH + dt.timedelta(seconds=seconds)
    return {"year": _const(moment.year), "month": _const(moment.month), "day": _const(moment.day),
            "hour": _const(moment.hour), "minute": _const(moment.minute),
            "usec": _const(moment.second * USEC_PER_SEC), "utc": True}


def _parse_body(text: str) -> dict[str, object]:
    """Weekdays, date and time (or `@SECONDS`); returns the fields found."""
    fields: dict[str, object] = {}
    cur = _Cursor(text)
    weekdays = _parse_weekdays(cur)
    if weekdays:
        fields["weekdays"] = weekdays
    # The date: "A-B-C" (year-month-day), "A-B" (month-day), or absent when a time follows.
    date_done = False
    if cur.peek() == "@":
        cur.pos += 1
        start = cur.pos
        while cur.peek().isascii() and cur.peek().isdigit():
            cur.pos += 1
        if cur.pos == start:
            raise _Invalid("@ must be followed by seconds since the epoch (e.g. @1767225600)")
        fields.update(_gmtime_fields(int(text[start:cur.pos])))
        date_done = True
        time_follows = False
    elif cur.peek() == "":
        time_follows = True
    else:
        save = cur.pos
        first = _parse_chain(cur, False, "date")
        time_follows = True
        if cur.peek() in ("", ":"):
            cur.pos = save  # that was an hour, not a date
        else:
            if cur.peek() == "~":
                fields["end_of_month"] = True
            elif cur.peek() != "-":
                raise _Invalid(f"unexpected {cur.peek()!r} after {text[save:cur.pos]!r}: a date is written "
                               f"YEAR-MONTH-DAY or MONTH-DAY (e.g. *-*-01), a time HH:MM[:SS]")
            cur.pos += 1
            second = _parse_chain(cur, False, "month or day")
            if cur.peek() in ("", " "):
                cur.skip_spaces()
                fields["month"], fields["day"] = first, second
            else:
                if fields.get("end_of_month"):
                    raise _Invalid("\"~\" (days from the end of the month) goes between month and day, "
                                   "e.g. *-02~01 for the last day of February")
                if cur.peek() == "~":
                    fields["end_of_month"] = True
                elif cur.peek() != "-":
                    raise _Invalid(f"unexpected {cur.peek()!r} in the date (write YEAR-MONTH-DAY, e.g. "
                                   f"2026-*-01)")
                cur.pos += 1
                third = _parse_chain(cur, False, "day")
                if cur.peek() not in ("", " "):
                    raise _Invalid(f"unexpected {cur.peek()!r} after the date (separate the date and the time "
                                   f"with a space)")
                cur.skip_spaces()
                fields["year"], fields["month"], fields["day"] = first, second, third
    if not date_done and time_follows:
        if cur.peek() == "":
            fields.update(hour=_const(0), minute=_const(0), usec=_const(0))
        else:
            fields["hour"] = _parse_chain(cur, False, "hour")
            if cur.peek() != ":":
                raise _Invalid(f"unexpected {cur.peek() or 'end'!r} after the hour: a time is written HH:MM or "
                               f"HH:MM:SS")
            cur.pos += 1
            fields["minute"] = _parse_chain(cur, False, "minute")
            if cur.peek() == "":
                fields["usec"] = _const(0)
            else:
                if cur.peek() != ":":
                    raise _Invalid(f"unexpected {cur.peek()!r} after the minutes (write HH:MM:SS, then optionally "
                                   f"a space and a time zone)")
                cur.pos += 1
                fields["usec"] = _parse_chain(cur, True, "second")
    if cur.peek() != "":
        raise _Invalid(f"unexpected {text[cur.pos:]!r} at the end (is a time zone misspelt? the order is "
                       f"[WEEKDAYS] [DATE] [TIME] [ZONE])")
    return fields


def _normalize_chain(chain: Chain, year: bool = False) -> Chain:
    if chain is None:
        return None
    items = []
    for comp in chain:
        start, stop, repeat = comp.start, comp.stop, comp.repeat
        if year:  # two-digit years: 12 -> 2012, 89 -> 1989
            start = start + 2000 if 0 <= start < 70 else start + 1900 if 70 <= start < 100 else start
            stop = stop + 2000 if 0 <= stop < 70 else stop + 1900 if 70 <= stop < 100 else stop
        if stop > start and repeat > 0:
            stop -= (stop - start) % repeat
        if (stop > start and repeat > 0 and start + repeat > stop) or start == stop:
            repeat, stop = 0, -1
        items.append(_Component(start, stop, repeat))
    if len(items) <= 1:
        return tuple(items)
    unique = sorted(set(items), key=lambda c: (c.start, c.stop, c.repeat))
    return tuple(unique)


def _check_chain(chain: Chain, what: str, low: int, high: int, end_of_month: bool = False) -> None:
    if not chain:
        return
    unit = USEC_PER_SEC if what == "second" else 1
    if end_of_month:
        high -= 3  # at most 28 days from the end of a month

    def show(v: int) -> str:
        return f"{v / unit:g}" if unit > 1 else str(v)

    for index, comp in enumerate(chain):
        limits = f"{show(low)}..{show(high) if unit == 1 else 59}"
        if end_of_month:
            limits = f"1..{high} (days counted from the end of the month)"
            if index:
                limits = (f"1..{high} (with \"~\", systemd allows 3 days fewer for each further item of a list; "
                          f"this is item {index + 1})")
        if not low <= comp.start <= high:
            raise _Invalid(f"{what} {show(comp.start)} is out of range {limits}")
        if comp.repeat > high - low:
            raise _Invalid(f"the {what} step /{show(comp.repeat)} is larger than the whole range {limits}")
        if comp.stop >= 0:
            if not low <= comp.stop <= high:
                raise _Invalid(f"{what} {show(comp.stop)} is out of range {limits}")
            if comp.start + comp.repeat > comp.stop:
                raise _Invalid(f"the {what} range {show(comp.start)}..{show(comp.stop)} is empty or runs backwards")
        elif end_of_month and comp.start - comp.repeat < low:
            raise _Invalid(f"the {what} step /{show(comp.repeat)} never repeats before the end of the month")
        elif not end_of_month and comp.start + comp.repeat > high:
            raise _Invalid(f"the {what} step {show(comp.start)}/{show(comp.repeat)} never repeats within "
                           f"{limits}")
        if end_of_month:
            high -= 3  # systemd lowers the limit again for each further item (chain_valid recursion)


@functools.lru_cache(maxsize=256)
def _parse(expr: str, names: tuple[str, str]) -> _Spec:
    """Parse and normalize `expr` as systemd does, `names` being the local zone's abbreviations;
    raises _Invalid with the reason."""
    text = expr
    fields: dict[str, object] = {}
    if text.lower().endswith(" utc"):
        fields["utc"] = True
        text = text[:-4]
    else:
        for j, name in enumerate(names):
            if name and len(text) > len(name) and text.lower().endswith(name.lower()) \
                    and text[-len(name) - 1] == " ":
                fields["dst"] = j
                text = text[:-len(name) - 1]
                break
        else:
            space = text.rfind(" ")
            if space >= 0 and _zone_name_valid(text[space + 1:]):
                fields["timezone"] = text[space + 1:]
                text = text[:space]
    if not text:
        raise _Invalid("it is empty")
    special = _SPECIALS.get(text.lower())
    if special is not None:
        fields.update(special)
    else:
        try:
            fields.update(_parse_body(text))
        except _Invalid:
            # Say plainly when the likely culprit is a zone name or a word that is not a weekday.
            last = text.rsplit(" ", 1)[-1]
            first = text.split(" ", 1)[0]
            if " " in text and any(ch.isalpha() for ch in last) and _weekday(last) is None:
                raise _Invalid(f"unknown time zone {last!r}: use an IANA name such as Asia/Seoul or Europe/Berlin, "
                               f"or UTC (see `timedatectl list-timezones`)") from None
            if " " in text and _weekday(last) is not None:
                raise _Invalid(f"the weekday {last!r} must come first (e.g. \"{last} {text.rsplit(' ', 1)[0]}\")") \
                    from None
            if first[:1].isalpha() and _weekday(first.split(",")[0].split(".")[0].split("-")[0]) is None:
                raise _Invalid(f"{first!r} is not a weekday (Mon..Sun or Monday..Sunday), a date or a time, nor "
                               f"one of minutely, hourly, daily, weekly, monthly, quarterly, semiannually, yearly"
                               ) from None
            raise
    spec = _Spec(**fields)  # type: ignore[arg-type]
    # systemd's calendar_spec_normalize()
    if spec.timezone == "UTC":
        spec = replace(spec, utc=True, timezone=None)
    weekdays = spec.weekdays if 0 < spec.weekdays < BITS_WEEKDAYS else -1
    spec = replace(spec, weekdays=weekdays, end_of_month=spec.end_of_month and spec.day is not None,
                   year=_normalize_chain(spec.year, year=True), month=_normalize_chain(spec.month),
                   day=_normalize_chain(spec.day), hour=_normalize_chain(spec.hour),
                   minute=_normalize_chain(spec.minute), usec=_normalize_chain(spec.usec))
    _check_chain(spec.year, "year", MIN_YEAR, MAX_YEAR)
    _check_chain(spec.month, "month", 1, 12)
    _check_chain(spec.day, "day", 1, 31, spec.end_of_month)
    _check_chain(spec.hour, "hour", 0, 23)
    _check_chain(spec.minute, "minute", 0, 59)
    _check_chain(spec.usec, "second", 0, 60 * USEC_PER_SEC - 1)
    return spec


# ---------------------------------------------------------------------------------------------------------
# normalized form (systemd's calendar_spec_to_string)


def _format_chain(chain: Chain, width: int, usec: bool) -> str:
    d = USEC_PER_SEC if usec else 1
    if not chain or (usec and any(c.start == 0 and c.stop < 0 and c.repeat == USEC_PER_SEC for c in chain)):
        return "*"
    parts = []
    for c in chain:
        text = f"{c.start // d:0{width}d}"
        if c.start % d:
            text += f".{c.start % d:06d}"
        if c.stop > 0:
            text += f"..{c.stop // d:0{width}d}"
            if c.stop % d:
                text += f".{c.stop % d:06d}"
        if c.repeat > 0 and not (c.stop > 0 and c.repeat == d):
            text += f"/{c.repeat // d}"
        if c.repeat > 0 and c.repeat % d:
            text += f".{c.repeat % d:06d}"
        parts.append(text)
    return ",".join(parts)


def _format_weekdays(bits: int) -> str:
    out: list[str] = []
    low = -1
    for x in range(8):
        on = x < 7 and bool(bits & (1 << x))
        if on and low < 0:
            out.append(("," if out else "") + _DAYS[x])
            low = x
        elif not on and low >= 0:
            if x > low + 1:
                out.append((".." if x > low + 2 else ",") + _DAYS[x - 1])
            low = -1
    return "".join(out)


def _to_string(spec: _Spec, zone: ZoneInfo) -> str:
    text = ""
    if 0 < spec.weekdays <= BITS_WEEKDAYS:
        text = _format_weekdays(spec.weekdays) + " "
    text += (f"{_format_chain(spec.year, 4, False)}-{_format_chain(spec.month, 2, False)}"
             f"{'~' if spec.end_of_month else '-'}{_format_chain(spec.day, 2, False)} "
             f"{_format_chain(spec.hour, 2, False)}:{_format_chain(spec.minute, 2, False)}:"
             f"{_format_chain(spec.usec, 2, True)}")
    if spec.utc:
        text += " UTC"
    elif spec.timezone:
        text += " " + spec.timezone
    elif spec.dst in (0, 1):
        name = _tznames(zone)[spec.dst]
        if name:
            text += " " + name
    return text


# ---------------------------------------------------------------------------------------------------------
# next elapse (systemd's find_next, with glibc's mktime/localtime)


class _Tm:
    """A `struct tm` whose fields may be out of range until normalized; `year` is the full year."""

    __slots__ = ("hour", "isdst", "mday", "min", "mon", "sec", "year")

    def __init__(self, year: int, mon: int, mday: int, hour: int, minute: int, sec: int, isdst: int) -> None:  # noqa: PLR0913, PLR0917 - systemd's struct tm, field by field
        self.year, self.mon, self.mday, self.hour, self.min, self.sec, self.isdst = (
            year, mon, mday, hour, minute, sec, isdst)

    def copy(self) -> _Tm:
        return _Tm(self.year, self.mon, self.mday, self.hour, self.min, self.sec, self.isdst)

    def set(self, other: _Tm) -> None:
        self.year, self.mon, self.mday, self.hour, self.min, self.sec, self.isdst = (
            other.year, other.mon, other.mday, other.hour, other.min, other.sec, other.isdst)

    def wall(self) -> int:
        """The fields as seconds since 1970 on a clock without zone changes (timegm's arithmetic)."""
        year = self.year + self.mon // 12
        days = dt.date(year, self.mon % 12 + 1, 1).toordinal() - _EPOCH_ORDINAL + self.mday - 1
        return days * 86400 + self.hour * 3600 + self.min * 60 + self.sec


class _Clock:
    """glibc's localtime_r/mktime (or gmtime_r/timegm for UTC) in one zone, including mktime's memory of
    the last UTC offset it used, which decides how a repeated wall-clock time is read."""

    def __init__(self, zone: ZoneInfo | None) -> None:
        self.zone = zone
        self.guess = 0

    def _offset(self, t: int) -> tuple[int, bool]:
        """The UTC offset in seconds at `t` and whether it is summer time."""
        assert self.zone is not None
        moment = dt.datetime.fromtimestamp(t, self.zone)
        offset = moment.utcoffset()
        return (offset // _SECOND if offset else 0), bool(moment.dst())

    def localtime(self, t: int) -> _Tm:
        offset, isdst = (0, False) if self.zone is None else self._offset(t)
        moment = _EPOCH + dt.timedelta(seconds=t + offset)
        return _Tm(moment.year, moment.month - 1, moment.day, moment.hour, moment.minute, moment.second,
                   int(isdst))

    def mktime(self, tm: _Tm) -> int:
        """Normalize `tm` in place and return its time in seconds since the epoch."""
        wall = tm.wall()
        if self.zone is None:
            t = wall
        else:
            t = self._resolve(wall, tm.isdst)
            self.guess = wall - t
        tm.set(self.localtime(t))
        return t

    def _resolve(self, wall: int, isdst: int) -> int:
        # The UTC offsets in force around `wall`: one fits (the usual case), two fit (a repeated hour),
        # or none (a skipped hour).
        before = self._offset(wall - _NEAR)[0]
        after = self._offset(wall + _NEAR)[0]
        if before == after and isdst < 0:
            return wall - before  # the usual case: no change nearby
        near = {before, self._offset(wall)[0], after}
        fits = sorted(o for o in near if self._offset(wall - o)[0] == o)
        if len(fits) == 1:
            t = wall - fits[0]
            if isdst >= 0 and self._offset(t)[1] != bool(isdst):
                t = self._other_kind(t, wall, isdst)
            return t
        if len(fits) >= 2:
            if isdst >= 0:
                for o in fits:
                    if self._offset(wall - o)[1] == bool(isdst):
                        return wall - o
            if self.guess in fits:
                return wall - self.guess
            # glibc refines a guess by the error it sees until it lands on a fitting offset.
            t = wall - self.guess
            for _ in range(8):
                offset = self._offset(t)[0]
                if t + offset == wall:
                    return t
                t = wall - offset
            return wall - fits[0]
        # Skipped: glibc returns the time the same distance past the change, preferring the reading whose
        # daylight-saving flag differs from the one asked for (or is set, when none was asked for).
        candidates = [wall - before, wall - after]
        for t in candidates:
            flag = self._offset(t)[1]
            if (isdst < 0 and flag) or (isdst >= 0 and flag != bool(isdst)):
                return t
        return candidates[0]

    def _other_kind(self, t: int, wall: int, isdst: int) -> int:
        # mktime() asked for summer (or standard) time at a moment that has the other: use the offset of
        # the nearest moment that has the kind asked for, probing a week at a time in both directions.
        stride = 601200
        for delta in range(stride, 536454000 // 2 + stride, stride):
            for direction in (-1, 1):
                offset, flag = self._offset(t + delta * direction)
                if flag == bool(isdst):
                    return wall - offset
        return t


def _end_of_month(clock: _Clock, tm: _Tm, day: int) -> int:
    t = tm.copy()
    t.mon += 1
    t.mday = 1 - day
    clock.mktime(t)
    return t.mday if t.mon == tm.mon else -1


def _match(spec: _Spec, chain: Chain, clock: _Clock, tm: _Tm, val: int, is_day: bool) -> tuple[int, int]:  # noqa: PLR0913, PLR0917 - systemd's find_matching_component()
    """The earliest value >= `val` allowed by `chain`: (1 if changed else 0, value), or (-1, val) if none."""
    if not chain:
        return 0, val
    end_of_month = spec.end_of_month and is_day
    best = -1
    found = False
    for comp in chain:
        if end_of_month:
            start = _end_of_month(clock, tm, comp.start)
            stop = _end_of_month(clock, tm, comp.stop)
            if stop > 0:
                start, stop = stop, start
        else:
            start, stop = comp.start, comp.stop
        if start >= val:
            if not found or start < best:
                best, found = start, True
        elif comp.repeat > 0:
            k = start + comp.repeat * ((val - start + comp.repeat - 1) // comp.repeat)
            if (not found or k < best) and (stop < 0 or k <= stop):
                best, found = k, True
    if not found:
        return -1, val
    return (1 if val != best else 0), best


def _within_bounds(clock: _Clock, tm: _Tm) -> int:
    """1 if `tm` is a real time, 0 if it was moved forward to one (then `tm` is updated), -1 if it is past
    the last year or would move backwards."""
    if tm.year > MAX_YEAR:
        return -1
    t = tm.copy()
    clock.mktime(t)
    # A field out of range moved the time (e.g. 03-33 became 04-02): restart the unit below it, or 04-01
    # would be skipped.
    if t.year != tm.year:
        cmp = (t.year > tm.year) - (t.year < tm.year)
        t.mon = 0
    elif t.mon != tm.mon:
        cmp = (t.mon > tm.mon) - (t.mon < tm.mon)
        t.mday = 1
    elif t.mday != tm.mday:
        cmp = (t.mday > tm.mday) - (t.mday < tm.mday)
        t.hour = 0
    elif t.hour != tm.hour:
        cmp = (t.hour > tm.hour) - (t.hour < tm.hour)
        t.min = 0
    elif t.min != tm.min:
        cmp = (t.min > tm.min) - (t.min < tm.min)
        t.sec = 0
    else:
        cmp = (t.sec > tm.sec) - (t.sec < tm.sec)
    if cmp < 0:
        return -1
    if cmp > 0:
        tm.set(t)
    return 1 if cmp == 0 else 0


def _weekday_matches(clock: _Clock, bits: int, tm: _Tm) -> bool:
    if bits < 0 or bits >= BITS_WEEKDAYS:
        return True
    t = tm.copy()
    clock.mktime(t)
    weekday = dt.date(t.year, t.mon + 1, t.mday).weekday()
    return bool(bits & (1 << weekday))


def _find_next(spec: _Spec, clock: _Clock, tm: _Tm, usec: int) -> tuple[_Tm, int] | None:
    c = tm.copy()
    tm_usec = usec
    start = (tm.year, tm.mon, tm.mday, tm.hour, tm.min, tm.sec, usec)
    # The summer-time flag given to mktime(): the expression's (-1 "find out" unless it named the local
    # standard or summer zone), or None once the search had to step over a skipped hour, from when on
    # mktime()'s own answer is kept (systemd's fix for zones with negative DST, in 252.39).
    dst: int | None = spec.dst
    for _ in range(_MAX_ITERATIONS):
        clock.mktime(c)
        if dst is not None:
            c.isdst = dst

        r, c.year = _match(spec, spec.year, clock, c, c.year, False)
        if r > 0:
            c.mon, c.mday, c.hour, c.min, c.sec, tm_usec = 0, 1, 0, 0, 0, 0
        if r < 0 or _within_bounds(clock, c) <= 0:
            return None

        r, month = _match(spec, spec.month, clock, c, c.mon + 1, False)
        c.mon = month - 1
        if r > 0:
            c.mday, c.hour, c.min, c.sec, tm_usec = 1, 0, 0, 0, 0
        if r < 0 or (r := _within_bounds(clock, c)) < 0:
            c.year += 1
            c.mon, c.mday, c.hour, c.min, c.sec, tm_usec = 0, 1, 0, 0, 0, 0
            continue
        if r == 0:
            continue

        r, c.mday = _match(spec, spec.day, clock, c, c.mday, True)
        if r > 0:
            c.hour, c.min, c.sec, tm_usec = 0, 0, 0, 0
        if r < 0 or (r := _within_bounds(clock, c)) < 0:
            c.mon += 1
            c.mday, c.hour, c.min, c.sec, tm_usec = 1, 0, 0, 0, 0
            continue
        if r == 0:
            continue

        if not _weekday_matches(clock, spec.weekdays, c):
            c.mday += 1
            c.hour, c.min, c.sec, tm_usec = 0, 0, 0, 0
            continue

        r, c.hour = _match(spec, spec.hour, clock, c, c.hour, False)
        if r > 0:
            c.min, c.sec, tm_usec = 0, 0, 0
        if r < 0 or (r := _within_bounds(clock, c)) < 0:
            c.mday += 1
            c.hour, c.min, c.sec, tm_usec = 0, 0, 0, 0
            continue
        if r == 0:
            # The hour just set may not exist on this day (a daylight-saving change): start over from the
            # normalized time.
            continue

        r, c.min = _match(spec, spec.minute, clock, c, c.min, False)
        if r > 0:
            c.sec, tm_usec = 0, 0
        if r < 0 or (r := _within_bounds(clock, c)) < 0:
            c.hour += 1
            c.min, c.sec, tm_usec = 0, 0, 0
            continue
        if r == 0:
            continue

        r, micro = _match(spec, spec.usec, clock, c, c.sec * USEC_PER_SEC + tm_usec, False)
        c.sec, tm_usec = divmod(micro, USEC_PER_SEC)
        if r < 0 or (r := _within_bounds(clock, c)) < 0:
            c.min += 1
            c.sec, tm_usec = 0, 0
            continue
        if r == 0:
            continue
        if (c.year, c.mon, c.mday, c.hour, c.min, c.sec, tm_usec) < start:
            # A skipped hour sent the search backwards: try again an hour later, from now on keeping the
            # flag mktime() found.
            c.hour += 1
            dst = None
            continue
        return c, tm_usec
    # systemd gives up the same way (and logs "Infinite loop in calendar calculation").
    return None


def _next_usec(spec: _Spec, zone: ZoneInfo, after_usec: int) -> int | None:
    if spec.utc:
        clock = _Clock(None)
    elif spec.timezone:
        clock = _Clock(ZoneInfo(spec.timezone))
    else:
        clock = _Clock(zone)
    usec = after_usec + 1
    seconds, tm_usec = divmod(usec, USEC_PER_SEC)
    found = _find_next(spec, clock, clock.localtime(seconds), tm_usec)
    if found is None:
        return None
    tm, tm_usec = found
    return clock.mktime(tm) * USEC_PER_SEC + tm_usec


# ---------------------------------------------------------------------------------------------------------
# public interface


def _spec(expr: str, zone: ZoneInfo) -> _Spec:
    if not isinstance(expr, str):
        raise ValueError(f"a schedule must be a string in systemd OnCalendar syntax, not {type(expr).__name__}; "
                         f"{_EXAMPLES}")
    try:
        return _parse(expr, _tznames(zone))
    except _Invalid as exc:
        raise ValueError(f"invalid calendar expression {expr!r}: {exc}; {_EXAMPLES}") from None


def validate(expr: str, timezone: str | None = None) -> None:
    """Check that `expr` is an OnCalendar expression systemd accepts (and `timezone` a known zone).

    Raises ValueError saying what is wrong and showing valid examples.
    """
    _spec(expr, resolve_zone(timezone))


def normalized(expr: str, timezone: str | None = None) -> str:
    """systemd's "Normalized form" of `expr` (what `systemd-analyze calendar` and timers show).

    Raises ValueError when `expr` or `timezone` is invalid.
    """
    zone = resolve_zone(timezone)
    return _to_string(_spec(expr, zone), zone)


def _to_usec(moment: dt.datetime) -> int:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no time zone; pass an aware datetime "
                         f"(e.g. datetime.now(timezone.utc))")
    return (moment - _EPOCH) // dt.timedelta(microseconds=1)


def next_elapse(expr: str, after: dt.datetime, timezone: str | None = None) -> dt.datetime | None:
    """The first time `expr` elapses strictly after `after` (an aware datetime), or None if never again.

    The result is aware, in `timezone` (else local time). Raises ValueError for an invalid expression or
    zone, or a naive `after`.
    """
    zone = resolve_zone(timezone)
    spec = _spec(expr, zone)
    usec = _next_usec(spec, zone, _to_usec(after))
    if usec is None:
        return None
    return (_EPOCH + dt.timedelta(microseconds=usec)).astimezone(zone)


def next_elapses(expr: str, after: dt.datetime, n: int, timezone: str | None = None) -> list[dt.datetime]:
    """Up to `n` successive elapses of `expr` after `after` (fewer if it stops elapsing), like
    `systemd-analyze calendar --iterations=N`. Raises ValueError as `next_elapse` does."""
    zone = resolve_zone(timezone)
    spec = _spec(expr, zone)
    usec = _to_usec(after)
    result: list[dt.datetime] = []
    for _ in range(n):
        found = _next_usec(spec, zone, usec)
        if found is None:
            break
        usec = found
        result.append((_EPOCH + dt.timedelta(microseconds=usec)).astimezone(zone))
    return result


def randomized(when: dt.datetime, delay_seconds: int, key: str) -> dt.datetime:
    """`when` plus a delay in [0, delay_seconds) that is fixed for each (key, when) pair.

    Like systemd's RandomizedDelaySec= it spreads jobs out; unlike it, the delay is derived from a hash of
    the job name and the elapse, so a restarted daemon and `kkua-backup status` show the same planned time
    and a missed run is not re-rolled. Whole seconds; `delay_seconds` <= 0 means no delay.
    """
    if delay_seconds <= 0:
        return when
    digest = hashlib.sha256(f"{key}\0{_to_usec(when)}".encode()).digest()
    return when + dt.timedelta(seconds=int.from_bytes(digest[:8], "big") % delay_seconds)


def for_systemd(expr: str, timezone: str | None) -> str:
    """`expr` as an OnCalendar= value that means the same under systemd: the configured `timezone`
    appended when the expression has no zone of its own. Raises ValueError when either is invalid."""
    zone = resolve_zone(timezone)
    spec = _spec(expr, zone)
    if timezone is None or spec.utc or spec.timezone or spec.dst >= 0:
        return expr
    return f"{expr} {timezone}"
