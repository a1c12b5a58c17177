"""Celery workers: measure one NTP server per task."""
