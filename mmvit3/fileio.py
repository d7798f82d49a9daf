"""Files written whole or not at all: mmengine's checkpoints, and downloads.

mmengine writes checkpoints (and the files dumped through ``mmengine.fileio``)
with ``open(path, 'wb')``: a run stopped while writing leaves a truncated
``epoch_N.pth`` that ``--resume`` then fails on. Here the bytes go to a
temporary file in the same directory, reach the disk, and are renamed over
the target, so a file under the final name is always complete. Downloads of
checkpoints by URL land in the cache the same way.
"""
import contextlib
import hashlib
import http.client
import os
import os.path as osp
import re
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple, Union

import torch.hub
from filelock import FileLock
from mmengine.fileio import LocalBackend, register_backend

# mkstemp creates files readable by their owner only; give checkpoints the
# permissions open() would
_UMASK = os.umask(0)
os.umask(_UMASK)

# torch hub's file names carry the first hex digits of the file's sha256
# (``resnet50-0676ba61.pth``, mmdet's ``..._20210902_120937-9d6b7cfa.pth``)
HASH_IN_NAME = re.compile(r'-([a-f0-9]{8,})\.[^.]+$')
# seconds a stalled connection may stay silent
TIMEOUT = 60
CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator:
    """A binary file object whose bytes appear at ``path`` only once the
    ``with`` block ends without an exception; until then, and after a
    failure, ``path`` is as it was."""
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # same directory: os.replace is an atomic rename only within a file system
    fd, tmp_path = tempfile.mkstemp(
        dir=directory, prefix=f'.{osp.basename(path)}.', suffix='.tmp')
    os.close(fd)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, 'wb') as f:  # f.name: the temporary path
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if osp.exists(tmp_path):
            os.remove(tmp_path)
        raise


class AtomicLocalBackend(LocalBackend):
    """:class:`mmengine.fileio.LocalBackend` whose ``put`` is all or nothing."""

    def put(self, obj: bytes, filepath: Union[str, Path]) -> None:
        with atomic_file(str(filepath)) as f:
            f.write(obj)

    def put_text(self,
                 obj: str,
                 filepath: Union[str, Path],
                 encoding: str = 'utf-8') -> None:
        self.put(obj.encode(encoding), filepath)


def register_atomic_local_backend() -> None:
    """Make plain paths (no ``scheme://``) use :class:`AtomicLocalBackend`."""
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')


# ---------------------------------------------------------------------------
# Downloads


class DownloadError(RuntimeError):
    """A URL that could not be fetched whole; nothing was cached."""


def is_url(source) -> bool:
    return isinstance(source, str) and source.startswith(('http://',
                                                          'https://'))


def cache_dir() -> str:
    """``$MMVIT3_CACHE``, else torch hub's checkpoints folder (shared with
    torch hub and mmengine, whose downloads are reused)."""
    if os.environ.get('MMVIT3_CACHE'):
        return os.environ['MMVIT3_CACHE']
    return osp.join(torch.hub.get_dir(), 'checkpoints')


def cache_name(url: str) -> Tuple[str, Optional[str]]:
    """The cache file name of ``url``, and the sha256 prefix its name
    promises (or None).

    A URL whose path ends in a file name (``.../name.pth``) is cached under
    that name, as torch hub does. Others, like the authors' release links
    ``https://cloud.tsinghua.edu.cn/f/<id>/?dl=1``, under their last path
    segment and a digest of the whole URL, so that two links never share a
    file.
    """
    path = urllib.parse.urlparse(url).path
    name = osp.basename(path)
    if '.' in name.strip('.'):
        match = HASH_IN_NAME.search(name)
        return name, match.group(1) if match else None
    segments = [s for s in path.split('/') if s]
    stem = re.sub(r'[^A-Za-z0-9_]+', '_', segments[-1] if segments else
                  urllib.parse.urlparse(url).netloc)
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return f'{stem}_url{digest}.pth', None


def download(url: str,
             check: Optional[Callable[[str], None]] = None,
             hint: str = 'give its local path instead of the URL',
             progress: bool = True) -> str:
    """The local path of ``url``'s file in the cache (:func:`cache_dir`),
    downloaded first if it is not there.

    The bytes are written to a temporary file and renamed into the cache
    only once complete: the length the server announced, the sha256 prefix
    in the file's name (if any), and ``check(tmp_path)`` (which raises for
    a bad file) must all agree. Processes that ask for the same URL at once
    (the ranks of a distributed run) wait for one download.
    """
    name, hash_prefix = cache_name(url)
    directory = cache_dir()
    path = osp.join(directory, name)
    os.makedirs(directory, exist_ok=True)
    with FileLock(osp.join(directory, f'.{name}.lock')):
        if not osp.isfile(path):
            _fetch(url, path, hash_prefix, check, hint, progress)
    return path


def _fetch(url: str, path: str, hash_prefix: Optional[str],
           check: Optional[Callable[[str], None]], hint: str,
           progress: bool) -> None:
    offline = (f'Without network access, download it elsewhere and {hint}, '
               f'or copy it to {path} (the cache, looked up first).')
    request = urllib.request.Request(url, headers={'User-Agent': 'mmvit3'})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as error:
        raise DownloadError(
            f'Could not download {url}: the server answered {error.code} '
            f'{error.reason}. Check the URL, or {hint}.') from None
    except (urllib.error.URLError, http.client.HTTPException,
            OSError) as error:
        raise DownloadError(f'Could not download {url}: {error}. '
                            f'{offline}') from None
    with response, atomic_file(path) as f:
        total = response.headers.get('Content-Length')
        total = int(total) if total and total.isdigit() else None
        sha256 = hashlib.sha256()
        bar = _Progress(f'Downloading {url} to {path}', total, progress)
        try:
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                f.write(chunk)
                sha256.update(chunk)
                bar.update(len(chunk))
        except (http.client.HTTPException, OSError) as error:
            raise DownloadError(
                f'Download of {url} stopped after {bar.done} bytes ({error!r})'
                f'; nothing was cached: run again. {offline}') from None
        finally:
            bar.close()
        if total is not None and bar.done != total:
            raise DownloadError(
                f'Download of {url} stopped after {bar.done} of {total} '
                f'bytes; nothing was cached: run again. {offline}')
        if hash_prefix and not sha256.hexdigest().startswith(hash_prefix):
            raise DownloadError(
                f'{url}: the downloaded file has sha256 {sha256.hexdigest()}, '
                f'its name promises {hash_prefix}...: corrupt or replaced; '
                'nothing was cached')
        f.flush()
        if check is not None:
            try:
                check(f.name)
            except Exception as error:
                raise DownloadError(f'{url} did not give a checkpoint '
                                    f'({error}); nothing was cached') from None


class _Progress:
    """A one-line progress bar on stderr, redrawn at most 5 times a second."""

    def __init__(self, label: str, total: Optional[int], enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.done, self.drawn_at = 0, 0.0
        if enabled:
            sys.stderr.write(f'{label}\n')

    def update(self, n: int) -> None:
        self.done += n
        if self.enabled and time.monotonic() - self.drawn_at > 0.2:
            self.draw()

    def draw(self) -> None:
        self.drawn_at = time.monotonic()
        mb = f'{self.done / 2**20:.1f}'
        if self.total:
            filled = '#' * (30 * self.done // self.total)
            line = (f'[{filled:<30}] {mb} / {self.total / 2**20:.1f} MiB '
                    f'{100 * self.done // self.total}%')
        else:
            line = f'{mb} MiB'
        sys.stderr.write(f'\r{line}')
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.draw()
            sys.stderr.write('\n')
