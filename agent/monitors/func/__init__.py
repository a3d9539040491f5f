"""The func monitor: func.c (kernel side) and monitor.py (Python side)."""

from agent.monitors.func import monitor  # noqa: F401  (registers the monitor)
