"""The broker's own test suite."""
