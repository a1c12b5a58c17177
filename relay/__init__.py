"""The head-node NTP relay: ``chronotick-ntp relay`` (see :mod:`relay.server`).

Compute nodes without Internet reach NTP only through the head node; this is
the relay they should query.  It loads ChronoTick's ``ntp_proxy_config.yaml``
unchanged.  It is a service of its own: it imports nothing from the
orchestrator, and the workers never import it.
"""
