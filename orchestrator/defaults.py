"""The orchestrator's defaults that more than one place names: each declared once, with its unit.

rq's ``defaults.py``: the CLI's help shows these without importing the module that uses them
(:mod:`orchestrator.exporter` brings in ``prometheus_client``; every command's start would pay for it),
and the module that uses them imports them from here.
"""

#: Default port of ``chronotick-ntp exporter`` (chrony_exporter's 9123, plus one).
EXPORTER_PORT = 9124
#: Default address: loopback only.  Another host's Prometheus needs ``--address`` or :data:`ENV_EXPORTER_ADDRESS`.
EXPORTER_ADDRESS = "127.0.0.1"
#: Where the exporter listens, from the environment (the systemd unit's env file): ``HOST``, ``HOST:PORT``,
#: ``[V6]`` or ``[V6]:PORT``.  ``--address`` replaces it whole; ``--port`` replaces its port.
ENV_EXPORTER_ADDRESS = "CHRONOTICK_EXPORTER_ADDRESS"

#: Where ``up`` keeps Redis' data when not told (relative to the working directory).
DATA_DIR = "chronotick-data"
#: The private Redis' port unless told (loopback only): not 6379, which a system Redis may hold.
#: Other commands reach it with CHRONOTICK_REDIS_URL=redis://127.0.0.1:6390/0.
REDIS_PORT = 6390

#: Where ``hub`` looks for chronyd when it is not on PATH (where Debian puts it).
CHRONYD = "/usr/sbin/chronyd"
#: The users chronyd drops to when started as root, the first that exists: Debian's, Fedora's, else nobody.
CHRONYD_USERS = ("_chrony", "chrony", "nobody")
#: Who the hub node's worker runs as when the hub is started as root (docs/operations.md creates it).
HUB_WORKER_USER = "chronotick"
#: Where chronyd's configuration, pid and drift files go unless told (relative to the working directory).
HUB_RUN_DIR = "chronotick-hub"
