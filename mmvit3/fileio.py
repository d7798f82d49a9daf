"""Atomic writes for mmengine's local file backend.

mmengine writes checkpoints (and the files dumped through ``mmengine.fileio``)
with ``open(path, 'wb')``: a run stopped while writing leaves a truncated
``epoch_N.pth`` that ``--resume`` then fails on. Here the bytes go to a
temporary file in the same directory, reach the disk, and are renamed over
the target, so a file under the final name is always complete.
"""
import os
import os.path as osp
import tempfile
from pathlib import Path
from typing import Union

from mmengine.fileio import LocalBackend, register_backend

# mkstemp creates files readable by their owner only; give checkpoints the
# permissions open() would
_UMASK = os.umask(0)
os.umask(_UMASK)


class AtomicLocalBackend(LocalBackend):
    """:class:`mmengine.fileio.LocalBackend` whose ``put`` is all or nothing."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        directory = osp.dirname(osp.abspath(filepath))
        os.makedirs(directory, exist_ok=True)
        # same directory: os.replace is an atomic rename only within a
        # file system
        fd, tmp_path = tempfile.mkstemp(
            dir=directory, prefix=f'.{osp.basename(filepath)}.', suffix='.tmp')
        try:
            os.chmod(tmp_path, 0o666 & ~_UMASK)
            with os.fdopen(fd, 'wb') as f:
                f.write(obj)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, filepath)
        except BaseException:
            if osp.exists(tmp_path):
                os.remove(tmp_path)
            raise

    def put_text(self,
                 obj: str,
                 filepath: Union[str, Path],
                 encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


def register_atomic_local_backend() -> None:
    """Make plain paths (no ``scheme://``) use :class:`AtomicLocalBackend`."""
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
