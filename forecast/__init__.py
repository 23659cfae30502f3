"""Judging a forecast: what it must beat (baselines.py) and how errors are compared (metrics.py)."""
