"""What the orchestrator writes and passes through Celery: round qualities, server statuses, round metadata.

``StrEnum``: JSON as plain strings, equal to the strings they decode back to.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from workers.config import Config, NtpSettings, ServiceSettings, ntp_from_mapping
from workers.contracts import Reason
from workers.quality import Thresholds


class Quality(StrEnum):
    """How a round ended: which gate its measurement passed, or why there is none."""

    STRICT = "strict"          # passed the configured thresholds
    RELAXED = "relaxed"        # passed only the 2x fallback
    STARVATION = "starvation"  # nothing passed any gate (or no majority agreed)
    OUTLIER = "outlier"        # the temporal filter refused the candidate


class ClosedBy(StrEnum):
    """Who finished a round (``closed_by`` in its record)."""

    CALLBACK = "callback"  # the chord's callback, with every server's outcome
    DEADLINE = "deadline"  # a closer, at the deadline, with what the tasks had reported
    EARLY = "early"        # the node's worker, once the outcomes in hand decided it (orchestrator.early)


class ServerStatus(StrEnum):
    """One server's part in a round record."""

    CHOSEN = "chosen"             # the one published (``best``) or the primary of a combination
    COMBINED = "combined"         # part of a published combination
    ACCEPTED = "accepted"         # a truechimer that passed the gate in force, not used
    REJECTED = "rejected"         # a truechimer that failed the gate in force
    FALSETICKER = "falseticker"   # its interval misses the one a majority agrees on
    FAILED = "failed"             # no usable reply after every attempt
    LATE = "late"                 # still out when the round was published early; its outcome is in ``late``


#: A server that reported nothing before its round was closed at the deadline.
REASON_NO_RESULT = Reason.NO_RESULT


@dataclass(frozen=True)
class RoundMeta:
    """What finishing a round needs: sent to the chord callback, kept with the round while it is open.

    It carries the whole ``clock_measurement.ntp`` section as its YAML mapping
    (:meth:`workers.config.NtpSettings.as_mapping`), validated again on arrival,
    so an option the callback uses needs no key of its own here and no default
    copied by hand.
    """

    round_id: str
    node: str
    dispatched_at: float
    deadline_at: float
    key_prefix: str
    history_length: int
    ntp: NtpSettings
    history_hours: float = ServiceSettings.history_hours  # the service's defaults, not copies of them
    record_detail: str = ServiceSettings.record_detail

    @classmethod
    def for_round(cls, config: Config, *, round_id: str, node: str, dispatched_at: float,
                  deadline_at: float) -> RoundMeta:
        """A round's metadata, every setting from the validated config (``ntp_service`` and ``ntp``)."""
        service = config.service
        return cls(round_id=round_id, node=node, dispatched_at=dispatched_at, deadline_at=deadline_at,
                   key_prefix=service.key_prefix, history_length=service.history_length,
                   history_hours=service.history_hours, record_detail=service.record_detail, ntp=config.ntp)

    @property
    def servers(self) -> list[str]:
        return [s.name for s in self.ntp.servers]

    @property
    def strict(self) -> Thresholds:
        return Thresholds.from_settings(self.ntp)

    def as_dict(self) -> dict[str, Any]:
        return {"round_id": self.round_id, "node": self.node, "dispatched_at": self.dispatched_at,
                "deadline_at": self.deadline_at, "key_prefix": self.key_prefix,
                "history_length": self.history_length, "history_hours": self.history_hours,
                "record_detail": self.record_detail,
                "ntp": self.ntp.as_mapping()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundMeta:
        return cls(round_id=data["round_id"], node=data["node"], dispatched_at=data["dispatched_at"],
                   deadline_at=data["deadline_at"], key_prefix=data["key_prefix"],
                   history_length=data["history_length"], history_hours=data["history_hours"],
                   record_detail=data["record_detail"],
                   ntp=ntp_from_mapping(data["ntp"], source=f"round {data['round_id']}"))
