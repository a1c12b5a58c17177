"""NTP wire format, sanity checks and a single client exchange."""
