"""Business-day calendars: weekends plus holidays (an EU default, or a holiday file), and day counts.

The EU default counts Saturday and Sunday as weekend and the public holidays the EU institutions
share: 1 January, Good Friday, Easter Monday, 1 May, 9 May (Europe Day), Ascension Day, Whit
Monday, 25 and 26 December. A holiday file (YAML) sets its own::

    name: lab-calendar
    base: eu            # or none: start from weekends only
    weekend: [sat, sun]
    holidays: [2026-12-24, 2026-12-31]

A calendar serialises to plain data (:meth:`Calendar.describe`) listing every holiday of the
years it is asked about, so an offline verifier recounts days without the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from dateutil.easter import easter

__all__ = ["Calendar", "eu_holidays", "load_calendar"]

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def eu_holidays(year: int) -> set[date]:
    """Return the public holidays the EU institutions share in ``year``."""
    e = easter(year)
    return {
        date(year, 1, 1),
        e - timedelta(days=2),  # Good Friday
        e + timedelta(days=1),  # Easter Monday
        date(year, 5, 1),
        date(year, 5, 9),  # Europe Day
        e + timedelta(days=39),  # Ascension Day
        e + timedelta(days=50),  # Whit Monday
        date(year, 12, 25),
        date(year, 12, 26),
    }


@dataclass(frozen=True)
class Calendar:
    """Which days are business days: not a weekend day, not a holiday."""

    name: str = "eu"
    base: str = "eu"
    weekend: frozenset[int] = frozenset({5, 6})
    extra_holidays: frozenset[date] = field(default_factory=frozenset)

    def holidays(self, years: Iterable[int]) -> set[date]:
        """Return every holiday of ``years``."""
        found: set[date] = set()
        for year in years:
            if self.base == "eu":
                found |= eu_holidays(year)
            found |= {d for d in self.extra_holidays if d.year == year}
        return found

    def is_business_day(self, day: date) -> bool:
        """Return whether ``day`` is a business day."""
        return day.weekday() not in self.weekend and day not in self.holidays([day.year])

    def business_days(self, start: datetime | date, end: datetime | date) -> int:
        """Count business days from ``start``'s day up to, not including, ``end``'s day (0 when end <= start)."""
        first = start.date() if isinstance(start, datetime) else start
        last = end.date() if isinstance(end, datetime) else end
        if last <= first:
            return 0
        holidays = self.holidays(range(first.year, last.year + 1))
        count, day = 0, first
        # Whole weeks at once: each holds 7 - |weekend| weekdays, less the holidays among them.
        weeks = (last - first).days // 7
        if weeks:
            count += weeks * (7 - len(self.weekend))
            span_end = first + timedelta(days=7 * weeks)
            count -= sum(1 for h in holidays if first <= h < span_end and h.weekday() not in self.weekend)
            day = span_end
        while day < last:
            if day.weekday() not in self.weekend and day not in holidays:
                count += 1
            day += timedelta(days=1)
        return count

    def add_business_days(self, start: datetime, days: int) -> datetime:
        """Return the time ``days`` business days after ``start`` (same time of day)."""
        moment, left = start, days
        while left > 0:
            moment += timedelta(days=1)
            if self.is_business_day(moment.date()):
                left -= 1
        return moment

    def describe(self, years: Iterable[int]) -> dict[str, Any]:
        """Return the calendar as plain data, with every holiday of ``years`` listed."""
        return {
            "name": self.name,
            "base": self.base,
            "weekend": [DAY_NAMES[d] for d in sorted(self.weekend)],
            "holidays": sorted(d.isoformat() for d in self.holidays(years)),
            "extra_holidays": sorted(d.isoformat() for d in self.extra_holidays),
        }

    @classmethod
    def from_description(cls, data: dict[str, Any]) -> Calendar:
        """Rebuild a calendar from :meth:`describe` output (its base rule and its own extra holidays)."""
        return cls(
            name=str(data.get("name", "")),
            base=str(data.get("base", "none")),
            weekend=frozenset(DAY_NAMES.index(d) for d in data.get("weekend", [])),
            extra_holidays=frozenset(date.fromisoformat(d) for d in data.get("extra_holidays", [])),
        )


def load_calendar(spec: str | Path | None) -> Calendar:
    """Return the EU default for ``None``/``"eu"``, weekends only for ``"weekends"``, else read a holiday file."""
    if spec is None or str(spec) == "eu":
        return Calendar()
    if str(spec) == "weekends":
        return Calendar(name="weekends", base="none")
    import yaml

    path = Path(spec).expanduser()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read the calendar {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"calendar {path}: expected a mapping (name, base, weekend, holidays)")
    unknown = set(raw) - {"name", "base", "weekend", "holidays"}
    if unknown:
        raise ValueError(f"calendar {path}: unknown keys {sorted(unknown)}")
    base = str(raw.get("base", "eu"))
    if base not in ("eu", "none"):
        raise ValueError(f"calendar {path}: base must be `eu` or `none`")
    try:
        weekend = frozenset(DAY_NAMES.index(str(d).lower()[:3]) for d in raw.get("weekend", ["sat", "sun"]))
        extra = frozenset(
            d if isinstance(d, date) else date.fromisoformat(str(d)) for d in raw.get("holidays", []) or []
        )
    except ValueError as exc:
        raise ValueError(f"calendar {path}: {exc}") from None
    return Calendar(name=str(raw.get("name", path.stem)), base=base, weekend=weekend, extra_holidays=extra)
