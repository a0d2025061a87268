"""Helpers shared by tests: bundle folders built on the fly."""
