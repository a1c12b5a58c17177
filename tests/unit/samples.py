"""Outcomes as query tasks return them, for the pure tests."""


def ok(server, *, delay, unc, stratum=2, offset=0.001):
    sample = {"server": server, "offset_s": offset, "delay_s": delay, "uncertainty_s": unc, "stratum": stratum,
              "leap": 0, "root_delay_s": 0.0, "root_dispersion_s": 0.0, "precision_s": 1e-7,
              "address": "127.0.0.1", "port": 123, "measured_at": 1.0}
    return {"status": "ok", "server": server, "sample": sample, "attempts": 1,
            "history": [{"attempt": 1, "reason": None}]}


def failed(server, reason="timeout", attempts=3):
    return {"status": "failed", "server": server, "reason": reason, "detail": "", "attempts": attempts,
            "history": [{"attempt": i + 1, "reason": reason} for i in range(attempts)]}
