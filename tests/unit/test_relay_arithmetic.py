"""The relay's default limits against ChronoTick's ARES schedule: each upstream stays within the published rules.

The demand comes from the shipped files (configs/config_ares_relay_2min_ntp.yaml and
configs/ntp_proxy_config.yaml); the limits are the relay's own
(relay/limits.py), fed with the times each request would arrive, in the
order :meth:`relay.server.PortRelay.from_client` applies them: the client's
bucket (past it: nothing), then the upstream's (past it: the relay's RATE
kiss, a policy refusal).  The rules: a start-up burst no larger than
chrony's ``iburst`` (4), then never more than one request every 4 s (NIST).
Warm-ups belong on the hub (issue #26): through the relay they are refused by
policy after the burst, and the node is told so.
"""

from pathlib import Path

from relay.limits import FORWARD, OVER_BUDGET, ClientLimits, UpstreamLimit
from relay.settings import (
    DEFAULT_CLIENT_BURST,
    DEFAULT_CLIENT_INTERVAL_S,
    DEFAULT_MIN_INTERVAL_S,
    DEFAULT_UPSTREAM_BURST,
    load_mappings,
)
from workers import config as config_mod
from workers.retry import ADVANCED_SAMPLE_SPACING_S

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

#: NIST: "never query more frequently than once every 4 seconds"; chrony's iburst: 4 requests at start.
NIST_INTERVAL_S = 4.0
IBURST = 4


def _requests(config, node_index: int, nodes: int, *, warm_up: bool = True, normal_rounds: int = 3) -> list[float]:
    """When one node's requests reach one relay port: its warm-up (every node at once), then its normal rounds
    at its phase (node i of n at i/n of the interval, as the beat spreads them) (s)."""
    timing, ntp = config.timing, config.ntp
    samples = ntp.advanced_samples if ntp.measurement_mode == "advanced" else 1
    phase = node_index * timing.normal_interval_s / nodes
    rounds = int(timing.warm_up_duration_s / timing.warm_up_interval_s) if warm_up else 0
    starts = [k * timing.warm_up_interval_s for k in range(rounds)]
    starts += [timing.warm_up_duration_s + phase + k * timing.normal_interval_s for k in range(normal_rounds)]
    return [start + i * ADVANCED_SAMPLE_SPACING_S for start in starts for i in range(samples)]


def _through(arrivals: list[tuple[float, str]], mapping) -> tuple[int, int, list[float]]:
    """(refused per client, policy-refused, when each forwarded request left) through one port's limits."""
    clients = ClientLimits(DEFAULT_CLIENT_INTERVAL_S, DEFAULT_CLIENT_BURST)
    upstream = UpstreamLimit(mapping.min_interval_s, mapping.upstream_burst, mapping.rate_backoff_s, now=0.0)
    refused_client = policy_refused = 0
    forwarded: list[float] = []
    for at, client in sorted(arrivals):
        if not clients.allow(client, at):
            refused_client += 1
            continue
        verdict = upstream.admit(at)
        if verdict == FORWARD:
            forwarded.append(at)
        else:
            assert verdict == OVER_BUDGET  # no upstream kissed here: every refusal is the budget's
            policy_refused += 1
    return refused_client, policy_refused, forwarded


def _most_in_any(times: list[float], window_s: float) -> int:
    """The most of ``times`` (sorted) in any window ``[t, t + window_s)``."""
    most, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - window_s:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_the_defaults_are_the_published_rules():
    assert DEFAULT_UPSTREAM_BURST <= IBURST
    assert DEFAULT_MIN_INTERVAL_S >= NIST_INTERVAL_S
    for mapping in load_mappings(CONFIGS / "ntp_proxy_config.yaml"):  # ChronoTick's file sets neither
        assert (mapping.upstream_burst, mapping.min_interval_s) == (DEFAULT_UPSTREAM_BURST, DEFAULT_MIN_INTERVAL_S)


def test_each_upstream_gets_a_small_burst_then_one_per_4_s_whatever_the_cluster_asks():
    config = config_mod.load(CONFIGS / "config_ares_relay_2min_ntp.yaml")
    assert config.ntp.measurement_mode == "advanced"
    mapping = load_mappings(CONFIGS / "ntp_proxy_config.yaml")[0]
    for count in (2, 10, 100, 1000):
        nodes = [f"ares-comp-{i}" for i in range(count)]
        arrivals = [(t, node) for i, node in enumerate(nodes) for t in _requests(config, i, count)]
        refused_client, policy_refused, forwarded = _through(arrivals, mapping)
        # In any window, the burst and one per 4 s: 19 in a minute, 154 in ten, however many nodes ask.
        for window_s in (NIST_INTERVAL_S, 60.0, 600.0):
            assert _most_in_any(forwarded, window_s) <= IBURST + window_s / NIST_INTERVAL_S, (count, window_s)
        # Nothing is dropped in silence: every request not forwarded is a policy refusal, told with RATE.
        assert refused_client == 0 and policy_refused == len(arrivals) - len(forwarded) > 0, count


def test_ares_nodes_in_normal_operation_pass_whole_up_to_ten():
    """ChronoTick's ARES config keeps working through the relay after its warm-up: 3 samples every 120 s a node,
    ten nodes at their phases, is one request per 4 s -- the budget exactly, and no refusal."""
    config = config_mod.load(CONFIGS / "config_ares_relay_2min_ntp.yaml")
    mapping = load_mappings(CONFIGS / "ntp_proxy_config.yaml")[0]
    for count in (len(config.service.nodes), 10):
        arrivals = [(t, f"node-{i}") for i in range(count)
                    for t in _requests(config, i, count, warm_up=False, normal_rounds=10)]
        refused_client, policy_refused, forwarded = _through(arrivals, mapping)
        assert (refused_client, policy_refused, len(forwarded)) == (0, 0, len(arrivals)), count


def test_a_warm_up_through_the_relay_is_refused_by_policy_after_the_burst():
    config = config_mod.load(CONFIGS / "config_ares_relay_2min_ntp.yaml")
    mapping = load_mappings(CONFIGS / "ntp_proxy_config.yaml")[0]
    arrivals = [(t, "ares-comp-11") for t in _requests(config, 0, 1, normal_rounds=0)]
    assert len(arrivals) == 60 * 3
    _, policy_refused, forwarded = _through(arrivals, mapping)
    assert len(forwarded) <= IBURST + 60 / NIST_INTERVAL_S
    assert policy_refused == len(arrivals) - len(forwarded)


def test_a_runaway_node_is_held_to_its_own_rate():
    mapping = load_mappings(CONFIGS / "ntp_proxy_config.yaml")[0]
    arrivals = [(i / 100, "runaway") for i in range(1000)]  # 100 a second for 10 s
    refused_client, _, forwarded = _through(arrivals, mapping)
    assert refused_client >= 1000 - (DEFAULT_CLIENT_BURST + 10 / DEFAULT_CLIENT_INTERVAL_S + 1)
    assert len(forwarded) <= DEFAULT_UPSTREAM_BURST + 10 / DEFAULT_MIN_INTERVAL_S + 1
