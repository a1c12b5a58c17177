"""The relay's default limits against ChronoTick's ARES schedule: the warm-up passes, the upstream stays capped.

The demand comes from the shipped files (configs/config_ares_2min_ntp.yaml and
configs/ntp_proxy_config.yaml); the limits are the relay's own token buckets
(relay/limits.py), fed with the times each request would arrive.
"""

from pathlib import Path

from relay.config import DEFAULT_CLIENT_BURST, DEFAULT_CLIENT_INTERVAL_S, load_mappings
from relay.limits import ClientLimits, TokenBucket
from workers import config as config_mod
from workers.measure import ADVANCED_SAMPLE_SPACING_S

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _warm_up_requests(config, node_index: int, nodes: int) -> list[float]:
    """When one node's requests reach one relay port during its warm-up and the normal rounds after (s)."""
    timing, ntp = config.timing, config.ntp
    samples = ntp.advanced_samples if ntp.measurement_mode == "advanced" else 1
    phase = node_index * timing.warm_up_interval_s / nodes  # the beat spreads nodes across the interval
    times = []
    rounds = int(timing.warm_up_duration_s / timing.warm_up_interval_s)
    starts = [phase + k * timing.warm_up_interval_s for k in range(rounds)]
    starts += [timing.warm_up_duration_s + phase + k * timing.normal_interval_s for k in range(3)]
    for start in starts:
        times += [start + i * ADVANCED_SAMPLE_SPACING_S for i in range(samples)]
    return times


def _through(arrivals: list[tuple[float, str]], mapping) -> tuple[int, int, int]:
    """(refused per client, refused upstream, forwarded) for arrivals through one port's limits."""
    clients = ClientLimits(DEFAULT_CLIENT_INTERVAL_S, DEFAULT_CLIENT_BURST)
    upstream = TokenBucket(mapping.min_interval_s, mapping.upstream_burst, updated_at=0.0)
    refused_client = refused_upstream = forwarded = 0
    for at, client in sorted(arrivals):
        if not clients.allow(client, at):
            refused_client += 1
        elif not upstream.take(at):
            refused_upstream += 1
        else:
            forwarded += 1
    return refused_client, refused_upstream, forwarded


def test_two_ares_nodes_warming_up_at_once_get_no_refusal_on_any_port():
    config = config_mod.load(CONFIGS / "config_ares_2min_ntp.yaml")
    nodes = list(config.service.nodes)
    assert len(nodes) == 2 and config.ntp.measurement_mode == "advanced"
    for mapping in load_mappings(CONFIGS / "ntp_proxy_config.yaml"):
        arrivals = [(t, node) for i, node in enumerate(nodes) for t in _warm_up_requests(config, i, len(nodes))]
        refused_client, refused_upstream, forwarded = _through(arrivals, mapping)
        assert (refused_client, refused_upstream) == (0, 0), mapping
        assert forwarded == len(arrivals) == 2 * (60 * 3 + 3 * 3)


def test_the_upstream_cap_still_holds_for_a_whole_cluster_warming_up():
    config = config_mod.load(CONFIGS / "config_ares_2min_ntp.yaml")
    mapping = load_mappings(CONFIGS / "ntp_proxy_config.yaml")[0]
    nodes = [f"ares-comp-{i}" for i in range(50)]
    arrivals = [(t, node) for i, node in enumerate(nodes) for t in _warm_up_requests(config, i, len(nodes))]
    _, refused_upstream, forwarded = _through(arrivals, mapping)
    horizon = max(t for t, _ in arrivals)
    # The upstream sees the burst and then one request per min_interval_s, whatever 50 nodes ask.
    assert forwarded <= mapping.upstream_burst + horizon / mapping.min_interval_s + 1
    assert refused_upstream == len(arrivals) - forwarded > 0


def test_a_runaway_node_is_held_to_its_own_rate():
    mapping = load_mappings(CONFIGS / "ntp_proxy_config.yaml")[0]
    arrivals = [(i / 100, "runaway") for i in range(1000)]  # 100 a second for 10 s
    refused_client, _, forwarded = _through(arrivals, mapping)
    assert forwarded <= DEFAULT_CLIENT_BURST + 10 / DEFAULT_CLIENT_INTERVAL_S + 1
    assert refused_client == 1000 - forwarded
