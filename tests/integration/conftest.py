"""Fixtures shared by the integration tests."""

from tests.measure_support import crash_at  # noqa: F401 - shared fixture: measure_log crash points
