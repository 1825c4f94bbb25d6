"""Helpers of the fault-injection suite (tests/test_faults_*.py; docs/reliability.md)."""
