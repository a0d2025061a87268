"""When a result is made, told in the time zone its source images are told in.

A result's own dates and times (Instance Creation, Content, Series) are the node's
"now". DICOM reads a time without Timezone Offset From UTC (0008,0201) as local time,
and one with it in that offset, which then holds for every date and time of the object,
the copied Study Date and Time too. So when the source says its offset, the result
says the same offset and tells its own times in it; a node whose clock runs in UTC (a
container) would otherwise stamp a result made at 10:15 in a +0100 hospital as 09:15.
When the source says none, the result says none either and its times are the node's
local time (set ``TZ`` for the service to the site's zone).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

from pydicom.dataset import Dataset

#: PS3.3 C.12.1.1.8: "&ZZXX", & is + or -, ZZ hours, XX minutes; offsets run from
#: -12:00 to +14:00.
_OFFSET = re.compile(r"([+-])(\d{2})(\d{2})")
_EARLIEST, _LATEST = timedelta(hours=-12), timedelta(hours=14)


@dataclass(frozen=True)
class ResultTime:
    """One instant as DICOM DA and TM, and the offset they are told in (None: local)."""

    date: str
    time: str
    offset: str | None

    def apply_to(self, ds: Dataset) -> None:
        """Make ``ds`` created at this instant: Instance Creation and Content Date/Time,
        and the offset they are told in where there is one."""
        ds.InstanceCreationDate = ds.ContentDate = self.date
        ds.InstanceCreationTime = ds.ContentTime = self.time
        if self.offset is not None:
            ds.TimezoneOffsetFromUTC = self.offset


def result_time(source: Dataset, now: datetime | None = None) -> ResultTime:
    """Now (or ``now``, aware) in ``source``'s Timezone Offset From UTC if it has a valid
    one, else the node's local time with no offset."""
    offset = _offset(source.get("TimezoneOffsetFromUTC"))
    if offset is None:
        moment = (now.astimezone() if now is not None else datetime.now()).replace(tzinfo=None)
        label = None
    else:
        moment = (now or datetime.now(UTC)).astimezone(offset)
        label = str(source.TimezoneOffsetFromUTC).strip()
    return ResultTime(moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f"), label)


def _offset(value: object) -> timezone | None:
    match = _OFFSET.fullmatch(str(value or "").strip())
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    delta = timedelta(hours=int(hours), minutes=int(minutes)) * (-1 if sign == "-" else 1)
    if int(minutes) >= 60 or not _EARLIEST <= delta <= _LATEST:
        return None
    return timezone(delta)
