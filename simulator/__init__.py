"""A fault-injecting NTP server for tests and the offline demo."""
