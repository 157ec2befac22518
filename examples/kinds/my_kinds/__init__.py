"""Example tuner kinds written outside utune (see docs/adding-a-kind.md)."""
