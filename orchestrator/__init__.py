"""The orchestrator: dispatch a round as a chord, select, publish to Redis."""
