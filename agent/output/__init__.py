"""Per-monitor outputs: console lines, CSV, JSON lines, written off the event path."""
