"""How many map rows to compute at a time at inference on a CPU.

glibc serves allocations of 32 MiB and more (its largest dynamic mmap
threshold) from fresh pages every time, paying a page fault per 4 KiB
touched; bands of a few MiB are reused from the heap and stay in cache.
"""
import torch

CPU_BAND_THRESHOLD_BYTES = 32 << 20
CPU_BAND_BYTES = 8 << 20


def band_rows(row_bytes: int, height: int, device: torch.device) -> int:
    """Rows per band for a map of ``height`` rows of ``row_bytes`` each (the
    largest intermediate's bytes per output row): all of them, except on a
    CPU where the map would reach ``CPU_BAND_THRESHOLD_BYTES``; then bands of
    about ``CPU_BAND_BYTES``."""
    if (torch.device(device).type != 'cpu'
            or row_bytes * height < CPU_BAND_THRESHOLD_BYTES):
        return height
    return max(1, CPU_BAND_BYTES // row_bytes)
