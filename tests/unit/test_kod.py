"""The Kiss-o'-Death memory (workers/kod.py): pure logic."""

from workers.contracts import Reason
from workers.kod import KissMemory
from workers.retry import RetryPolicy


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_backs_off_and_doubles():
    clock = Clock()
    memory = KissMemory(clock=clock)
    memory.record("s", "RATE", config_id="c1", policy=RetryPolicy(1.0, rate_backoff_s=480))
    assert memory.refusal("s", config_id="c1")[0] == Reason.KOD_BACKOFF
    clock.now += 481
    assert memory.refusal("s", config_id="c1") is None
    memory.record("s", "RATE", config_id="c1", policy=RetryPolicy(1.0, rate_backoff_s=480))  # again: twice as long
    clock.now += 900
    assert memory.refusal("s", config_id="c1")[0] == Reason.KOD_BACKOFF
    clock.now += 61
    assert memory.refusal("s", config_id="c1") is None


def test_deny_and_rstr_last_until_the_config_changes():
    memory = KissMemory(clock=Clock())
    memory.record("d", "DENY", config_id="c1", policy=RetryPolicy(1.0, rate_backoff_s=1))
    memory.record("r", "RSTR", config_id="c1", policy=RetryPolicy(1.0, rate_backoff_s=1))
    assert memory.refusal("d", config_id="c1")[0] == Reason.KOD_DEMOBILISED
    assert memory.refusal("r", config_id="c1")[0] == Reason.KOD_DEMOBILISED
    assert memory.refusal("d", config_id="c2") is None  # a new configuration: try again


def test_other_kiss_codes_are_not_acted_on():
    memory = KissMemory(clock=Clock())
    assert memory.record("s", "INIT", config_id="c1", policy=RetryPolicy(1.0, rate_backoff_s=1)) is None
    assert memory.refusal("s", config_id="c1") is None


