"""BPF maps read and written in batches: BPF_MAP_{LOOKUP,UPDATE,DELETE}_BATCH through
libbcc, and sums over per-CPU values."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from array import array
from typing import Any

# BCC 0.26's TableBase.items_lookup_batch() passes one c_uint32 as both the batch token
# and the count, so a table that needs more than one bpf(2) call is read wrongly; these
# keep them apart. The batch token is a u32 for every map used here: the key of an
# array (the kernel's generic_map_lookup_batch) and the bucket index of a hash map.


def _lib() -> Any:
    from bcc.libbcc import lib  # imported late: no libbcc at import time

    return lib


def _batch_error(op: str, table: Any) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{op} on {table.name!r}: {os.strerror(err)}")


def lookup_batch_raw(
    table: Any, after: int | None = None, limit: int | None = None
) -> tuple[Any, Any, int]:
    """Keys and values of a BCC table as two ctypes arrays, and how many were read.

    ``after``: an array key to start after; ``limit``: at most this many entries. A
    per-CPU value holds one item per possible CPU.
    """
    n = limit or table.max_entries
    keys, values = (table.Key * n)(), (table.Leaf * n)()
    ksize, vsize = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
    token_in = ctypes.c_uint32(after or 0)
    token_out = ctypes.c_uint32(0)
    have_token = after is not None
    total = 0
    while total < n:
        count = ctypes.c_uint32(n - total)
        res = _lib().bpf_lookup_batch(
            table.map_fd,
            ctypes.byref(token_in) if have_token else None,
            ctypes.byref(token_out),
            ctypes.byref(keys, ksize * total),
            ctypes.byref(values, vsize * total),
            ctypes.byref(count),
        )
        total += count.value
        if res != 0:
            if ctypes.get_errno() == errno.ENOENT:  # the end of the map
                break
            raise _batch_error("BPF_MAP_LOOKUP_BATCH", table)
        if count.value == 0:
            break
        token_in.value, have_token = token_out.value, True
    return keys, values, total


def lookup_batch(
    table: Any, after: int | None = None, limit: int | None = None
) -> list[tuple[Any, Any]]:
    """The (key, value) pairs of a BCC table (see lookup_batch_raw)."""
    keys, values, total = lookup_batch_raw(table, after, limit)
    return [(keys[i], values[i]) for i in range(total)]


def zero_array_range(table: Any, first: int, n: int) -> None:
    """Zero entries first..first+n-1 of a (per-CPU) array: one BPF_MAP_UPDATE_BATCH."""
    keys = (table.Key * n)(*range(first, first + n))
    values = (table.Leaf * n)()
    count = ctypes.c_uint32(n)
    res = _lib().bpf_update_batch(
        table.map_fd, ctypes.byref(keys), ctypes.byref(values), ctypes.byref(count)
    )
    if res != 0:
        raise _batch_error("BPF_MAP_UPDATE_BATCH", table)


def delete_keys(table: Any, keys: list[Any]) -> None:
    """Delete these keys of a hash with BPF_MAP_DELETE_BATCH, one by one if that fails."""
    if not keys:
        return
    arr = (table.Key * len(keys))(*keys)
    count = ctypes.c_uint32(len(keys))
    if _lib().bpf_delete_batch(table.map_fd, ctypes.byref(arr), ctypes.byref(count)) == 0:
        return
    for key in keys[count.value :]:  # the batch stops at its first failure
        with contextlib.suppress(KeyError):  # gone already
            del table[key]


def sum_columns(flat: array, width: int) -> list[int]:
    """Sum the per-CPU copies of a u64 array map: ``flat`` is entries x CPUs."""
    ncpu = len(flat) // width
    out = [0] * width
    for cpu in range(ncpu):
        for i, v in enumerate(flat[cpu::ncpu]):
            out[i] += v
    return out
