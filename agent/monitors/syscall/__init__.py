"""The syscall monitor: syscall.c (kernel side) and monitor.py (Python side)."""

from agent.monitors.syscall import monitor  # noqa: F401  (registers the monitor)
