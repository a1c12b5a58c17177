"""Development tooling above the service: a fault-injecting NTP server, private processes, the offline demo."""

#: The offline demo's configuration, relative to the repository's root (``chronotick-ntp demo --config``).
DEMO_CONFIG = "configs/config_local_demo.yaml"
