"""The exec monitor: exec.c (kernel side) and monitor.py (Python side)."""

from agent.monitors.exec import monitor  # noqa: F401  (registers the monitor)
