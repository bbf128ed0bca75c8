"""Diffcast neural diffs."""
