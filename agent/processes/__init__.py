"""The process table and the kernel tracker that keeps it current (issue 17).

records.py   the tracker's record (mirror of tracker.h) and the wait status decoded
process.py   Process: one process instance as the table and the API show it
procscan.py  the processes running now, read from /proc (the table's seed)
table.py     ProcessTable: bounded, thread-safe; queries, ancestry, children
tracker.py   ProcessTracker: the BPF program (tracker.c), its thread, the cgroup source
lineage.py   AncestorStage: the optional ``ancestors`` list added to every event
"""
