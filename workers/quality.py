"""Quality thresholds: the gate a sample must pass to be published.

Shared by the worker (which retries a sample that would not pass even the
loosest gate in force) and the orchestrator's selection, so it lives on the
worker side of the one-way import rule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: How much the fallback loosens delay and uncertainty (ChronoTick's 2x).
RELAXED_FACTOR = 2.0


@dataclass(frozen=True)
class Thresholds:
    """Upper bounds on delay and uncertainty (seconds) and the stratum range.

    Stratum is never relaxed: a server's distance from a reference clock does
    not get better because the network is congested.
    """

    max_delay_s: float
    max_uncertainty_s: float
    min_stratum: int
    max_stratum: int

    def relaxed(self, factor: float = RELAXED_FACTOR) -> Thresholds:
        return Thresholds(self.max_delay_s * factor, self.max_uncertainty_s * factor,
                          self.min_stratum, self.max_stratum)

    def violations(self, sample: dict) -> list[str]:
        """Why ``sample`` (a :meth:`Sample.as_dict`) fails this gate; empty if it passes."""
        found = []
        if sample["delay_s"] > self.max_delay_s:
            found.append(f"delay {sample['delay_s'] * 1e3:.3f} ms > {self.max_delay_s * 1e3:.3f} ms")
        if sample["uncertainty_s"] > self.max_uncertainty_s:
            found.append(f"uncertainty {sample['uncertainty_s'] * 1e3:.3f} ms > "
                         f"{self.max_uncertainty_s * 1e3:.3f} ms")
        if not self.min_stratum <= sample["stratum"] <= self.max_stratum:
            found.append(f"stratum {sample['stratum']} outside {self.min_stratum}-{self.max_stratum}")
        return found

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        return cls(**data)

    @classmethod
    def from_settings(cls, ntp) -> Thresholds:
        """The strict gate of a :class:`workers.config.NtpSettings`."""
        return cls(ntp.max_delay, ntp.max_acceptable_uncertainty, ntp.min_stratum, ntp.max_stratum)
