"""Opening checkpoint files that may come from anywhere.

A checkpoint is a pickle, and a pickle is a program: unpickled by the
standard library, a crafted file runs whatever code it names. Every
checkpoint that mmvit3 opens, and every checkpoint that mmengine opens from a
local path or an http(s) URL once ``import mmvit3`` has run (``load_from``,
``--resume``, ``load_checkpoint``, ``init_detector`` / ``init_model``, the
inferencers), is read here instead:

* Only files written by ``torch.save`` are opened: a zip archive (checked by
  its leading bytes, as torch does) of uncompressed records, or a file of
  torch's legacy (before 1.6, non-zip) format, told by its magic number.
  A TorchScript archive is a program, not weights: refused. Tensors must lie
  inside their storages, and storages must be the size the file says.
* The pickle is run by :class:`_RestrictedUnpickler`, which resolves an exact
  table of globals (:data:`_ALLOWED`) and calls none of them directly: for
  every allowed global the reader checks the arguments and builds the object
  itself (a tensor on a storage of the file, an ``OrderedDict``, a numeric
  numpy array, mmengine's ``HistoryBuffer``...). A name with a dot in it is
  never resolved. Calling anything else is refused ("refused global X");
  an instance of a class outside the table (the authors' yacs ``CfgNode``)
  becomes an inert :class:`ForeignObject`. ``BUILD`` (``__setstate__``)
  runs only on objects the reader has just made and validates their state;
  items are added only to plain lists, dicts and sets, keyed by plain
  values; tuples nest at most :data:`MAX_TUPLE_DEPTH` deep.

Nothing here changes state outside the objects it returns: no allowlist of
torch's is touched, no class attribute is written, no module is imported.
"""
import io
import math
import os
import os.path as osp
import pickle
import sys
import zipfile
from collections import Counter, OrderedDict
from typing import Any, Callable, Dict, NamedTuple, Optional

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

from .fileio import download, is_url

STATE_KEYS = {'model': 'model', 'ema': 'state_dict_ema'}

# torch.save's zip archives begin with a zip local file header; files of
# torch's legacy format begin with a protocol-2 pickle of its magic number.
ZIP_MAGIC = b'PK\x03\x04'
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_VERSION = 1001
LEGACY_MAGIC = b'\x80\x02\x8a\x0a' + LEGACY_MAGIC_NUMBER.to_bytes(10, 'little')

# What to do instead of downloading, for the offline error.
PRETRAINED_HINT = (
    "give its local path instead (a config's backbone: --cfg-options "
    'model.backbone.init_cfg.checkpoint=PATH; timm: '
    'pretrained_cfg_overlay=dict(file=PATH))')
MMENGINE_HINT = ('give its local path instead of the URL (load_from=PATH, '
                 '--resume PATH, tools/test.py CONFIG PATH)')


class CheckpointError(RuntimeError):
    """A file that is not a complete checkpoint, or holds more than data."""


class ForeignObject(dict):
    """Inert stand-in for an instance of a class that the reader does not
    import (the authors' yacs ``CfgNode``, an ``argparse.Namespace``...).

    Its dict items (a ``CfgNode`` is a dict), the arguments it was created
    with and its pickled state are kept as plain data; no code of the
    original class runs.
    """

    def __init__(self, pickled_class: str, pickled_args: tuple = ()):
        super().__init__()
        self.pickled_class = pickled_class
        self.pickled_args = pickled_args
        self.pickled_state = None

    def __repr__(self):
        return f'ForeignObject({self.pickled_class}, {dict.__repr__(self)})'


# ---------------------------------------------------------------------------
# Reading a file


def load_file(source: str, map_location='cpu') -> Any:
    """Load a checkpoint from a path or an http(s) URL (downloaded once into
    the cache, see :func:`mmvit3.fileio.download`) without running
    anything it pickled.

    Raises :class:`CheckpointError` for a file that is not a complete
    checkpoint or that holds code.
    """
    if is_url(source):
        return read_checkpoint(
            download(source, check=check_complete, hint=PRETRAINED_HINT),
            map_location)
    if not osp.isfile(source):
        raise FileNotFoundError(
            f'Pretrained checkpoint not found: {source!r}. Download the '
            'H-ViT3 ImageNet checkpoint of this variant, or give its URL, '
            'and point model.backbone.init_cfg.checkpoint at it (e.g. '
            '--cfg-options model.backbone.init_cfg.checkpoint=PATH), or set '
            'model.backbone.init_cfg=None to train from scratch.')
    return read_checkpoint(source, map_location)


def read_checkpoint(path: str, map_location='cpu') -> Any:
    """Read the local checkpoint file ``path`` (see the module docstring).

    ``map_location`` is torch.load's: None, a device, a dict of locations
    or a callable ``(storage, location) -> storage``.
    """
    with open(path, 'rb') as file:
        read = _read_zip if _format(file, path) == 'zip' else _read_legacy
        return read(file, path, map_location)


def check_complete(path: str) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a whole
    checkpoint file (a zip archive whose directory, at its end, is there;
    or a legacy-format file); what it holds is checked when it is read."""
    with open(path, 'rb') as file:
        if _format(file, path) == 'zip':
            _Archive(file, path)


def _format(file, path: str) -> str:
    """'zip' or 'legacy', told by the first bytes of ``file``; for any other
    file, an error that says what it looks like."""
    head = file.read(64)
    file.seek(0)
    if head.startswith(ZIP_MAGIC):
        return 'zip'
    if head.startswith(LEGACY_MAGIC):
        return 'legacy'
    text = head.lstrip(b'\xef\xbb\xbf \t\r\n').lower()
    if text.startswith((b'<!doctype', b'<html', b'<?xml', b'<head')):
        raise CheckpointError(
            f'{path}: an HTML page, not a checkpoint (a download that '
            'returned an error or sign-in page?): download the file again '
            'from its source')
    if text.startswith(b'version https://git-lfs'):
        raise CheckpointError(f'{path}: a Git LFS pointer, not the '
                              'checkpoint: fetch the file itself '
                              '(git lfs pull)')
    raise _corrupt(path, 'neither a torch.save zip archive nor a legacy '
                   'torch file')


def _read_zip(file, path: str, map_location) -> Any:
    archive = _Archive(file, path)

    def storage(key, nbytes, itemsize, location):
        return _restore(archive.storage(key, nbytes), location, map_location)

    return _unpickle(io.BytesIO(archive.read('data.pkl')), path, storage)


def _read_legacy(file, path: str, map_location) -> Any:
    """A file of torch's format before 1.6: pickles of the magic number, the
    format version and the system's sizes; the data pickle (with storages as
    persistent ids); the list of storage keys; then, in the list's order,
    each storage as an int64 element count followed by its elements.

    The storages come after the data pickle that says their dtypes and sizes,
    so it is read twice: first on the meta device, to measure them.
    """
    for expected in (LEGACY_MAGIC_NUMBER, LEGACY_VERSION):
        if _unpickle(file, path) != expected:
            raise _corrupt(path, 'unknown legacy torch format')
    sizes = _unpickle(file, path)
    if type(sizes) is not dict or sizes.get('little_endian') is not True:
        raise CheckpointError(f'{path}: written on a big-endian machine, '
                              'which is not read here')
    start = file.tell()
    declared = {}

    def measure(key, nbytes, itemsize, location):
        declared[key] = nbytes, itemsize, location
        return torch.empty(nbytes, dtype=torch.uint8,
                           device='meta').untyped_storage()

    _unpickle(file, path, measure)
    keys = _unpickle(file, path)
    if type(keys) is not list or sorted(keys) != sorted(declared):
        raise _corrupt(path, 'the storage list does not match the data')
    file_size = os.fstat(file.fileno()).st_size
    storages = {}
    for key in keys:
        nbytes, itemsize, location = declared[key]
        count = int.from_bytes(file.read(8), 'little', signed=True)
        if count * itemsize != nbytes or nbytes > file_size - file.tell():
            raise _corrupt(path, f'storage {key} is not {nbytes} bytes')
        data = torch.empty(nbytes, dtype=torch.uint8)
        if file.readinto(memoryview(data.numpy())) != nbytes:
            raise _corrupt(path, f'storage {key} is short')
        storages[key] = _restore(data.untyped_storage(), location,
                                 map_location)
    file.seek(start)
    return _unpickle(file, path, lambda key, *_: storages[key])


def _corrupt(path: str, error) -> CheckpointError:
    return CheckpointError(f'{path}: not a PyTorch checkpoint, or truncated: '
                           f're-download it ({error})')


def _restore(storage: torch.UntypedStorage, location: str, map_location):
    """Place a storage as torch.load's ``map_location`` says."""
    restore = torch.serialization.default_restore_location
    if callable(map_location):
        moved = map_location(storage, location)
        return restore(storage, location) if moved is None else moved
    if isinstance(map_location, dict):
        return restore(storage, map_location.get(location, location))
    return restore(storage,
                   location if map_location is None else str(map_location))


class _Archive:
    """The records of a ``torch.save`` zip archive, read with :mod:`zipfile`
    (whose CRC check catches a corrupt record)."""

    def __init__(self, file, path: str):
        self.path = path
        self.size = os.fstat(file.fileno()).st_size
        try:
            self.zip = zipfile.ZipFile(file)
            names = self.zip.namelist()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
            raise self.corrupt(error) from None
        if any(osp.basename(name) == 'constants.pkl' for name in names):
            raise CheckpointError(
                f'{path}: a TorchScript archive (torch.jit.save): a program, '
                'not a checkpoint of weights; it is not opened here')
        for info in self.zip.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(
                    f'{path}: {info.filename} is compressed, which torch.save '
                    'never does: not a PyTorch checkpoint')
        # torch.save puts every record below one folder (its name varies)
        self.prefix = names[0].split('/', 1)[0] + '/' if names else ''
        if self.prefix + 'byteorder' in self.zip.NameToInfo:
            order = self.read('byteorder').decode('ascii', 'replace')
            if order != sys.byteorder:
                raise CheckpointError(
                    f'{path}: written on a {order!r}-endian machine, which '
                    f'is not read here: re-save it on a {sys.byteorder}-'
                    'endian one')

    def corrupt(self, error) -> CheckpointError:
        return _corrupt(self.path, error)

    def info(self, name: str) -> zipfile.ZipInfo:
        try:
            return self.zip.getinfo(self.prefix + name)
        except KeyError:
            raise self.corrupt(f'no record {name!r}') from None

    def read(self, name: str) -> bytes:
        self.info(name)
        try:
            return self.zip.read(self.prefix + name)
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            raise self.corrupt(error) from None

    def storage(self, key: str, nbytes: int) -> torch.UntypedStorage:
        """The bytes of storage ``key``, which must be exactly ``nbytes``."""
        name = f'data/{key}'
        info = self.info(name)
        if info.file_size != nbytes or nbytes > self.size:
            raise self.corrupt(f'record {name} holds {info.file_size} bytes, '
                               f'the pickle says {nbytes}, the file has '
                               f'{self.size}')
        data = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with self.zip.open(info) as record:
                got = record.readinto(memoryview(data.numpy()))
                record.read(1)  # at the end: zipfile checks the CRC
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            raise self.corrupt(error) from None
        if got != nbytes:
            raise self.corrupt(f'record {name} is short')
        return data.untyped_storage()


# ---------------------------------------------------------------------------
# The restricted unpickler


class _Global(NamedTuple):
    """A global the file may name: ``build(reader, args)`` makes the object
    when the pickle calls it (REDUCE); ``new`` when it instantiates it
    (NEWOBJ)."""
    qualname: str
    build: Optional[Callable] = None
    new: Optional[Callable] = None


class _ForeignGlobal(NamedTuple):
    """A global outside the table: never imported; instantiating it gives a
    :class:`ForeignObject`, calling it is refused."""
    qualname: str


class _StorageType(NamedTuple):
    """``torch.<T>Storage`` in a persistent id: the dtype of its bytes (None
    for ``UntypedStorage``)."""
    dtype: Optional[torch.dtype]


class _Storage(NamedTuple):
    """A storage of the file, as persistent ids hand it to the rebuild
    functions."""
    data: torch.UntypedStorage
    dtype: Optional[torch.dtype]


class _StatisticsMethod(NamedTuple):
    """``getattr(HistoryBuffer, name)``: how HistoryBuffer's pickled state
    names its class's statistics methods; kept as the name only."""
    name: str


HISTORY_STATISTICS = ('min', 'max', 'current', 'mean')
HISTORY_STATE_KEYS = {'max_length', '_log_history', '_count_history'}

# Numeric numpy dtypes (by the names numpy pickles them with): mmengine's
# message hub holds float64 / int64 arrays and scalars.
NUMPY_DTYPES = ('b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8', 'f2',
                'f4', 'f8', 'c8', 'c16')

# The dtypes a tensor of the file may have: numbers and bool, not quantized
# or bit-packed types.
TENSOR_DTYPES = {
    getattr(torch, name)
    for name in ('bool', 'uint8', 'int8', 'int16', 'int32', 'int64', 'uint16',
                 'uint32', 'uint64', 'float16', 'bfloat16', 'float32',
                 'float64', 'complex64', 'complex128', 'float8_e4m3fn',
                 'float8_e5m2', 'float8_e4m3fnuz', 'float8_e5m2fnuz')
    if hasattr(torch, name)
}

STORAGE_TYPES = {
    'ByteStorage': torch.uint8,
    'CharStorage': torch.int8,
    'ShortStorage': torch.int16,
    'IntStorage': torch.int32,
    'LongStorage': torch.int64,
    'HalfStorage': torch.float16,
    'BFloat16Storage': torch.bfloat16,
    'FloatStorage': torch.float32,
    'DoubleStorage': torch.float64,
    'BoolStorage': torch.bool,
    'ComplexFloatStorage': torch.complex64,
    'ComplexDoubleStorage': torch.complex128,
    'UntypedStorage': None,
}

# Beyond this, element counts overflow torch's int64 arithmetic.
MAX_NUMEL = 2**62

# Hashing a tuple recurses in C without a limit: nested deeply enough, it
# overflows the stack and kills the process. No checkpoint nests tuples
# anywhere near this deep.
MAX_TUPLE_DEPTH = 64


class _Malformed(ValueError):
    """An allowed object with arguments or state unlike those that torch,
    numpy or mmengine write."""


def _refused(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f'{path}: refused {what}: this file contains code, not only weights. '
        'Nothing of it was run. Use the checkpoint from its original '
        'publisher, or have whoever trusts this file re-save its weights '
        '(torch.save(model.state_dict(), path)).')


def _describe(obj) -> str:
    if type(obj) in (_Global, _ForeignGlobal):
        return f'global {obj.qualname}'
    return f'a {type(obj).__name__}'


def _check_key(key) -> None:
    """Dict keys and set items: values whose hashing and comparison run no
    code of the file's choosing (tuples are bounded in depth when made)."""
    if type(key) in (str, bytes, int, float, bool, type(None)):
        return
    if type(key) is tuple:
        for item in key:
            _check_key(item)
        return
    raise _Malformed('dict keys and set items must be numbers, strings or '
                     f'tuples of them, got a {type(key).__name__}')


def _int(value, what: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise _Malformed(f'{what} must be an int >= {minimum}, got {value!r}')
    return value


def _ints(values, what: str) -> tuple:
    if type(values) not in (tuple, list):
        raise _Malformed(f'{what} must be a tuple of ints, got {values!r}')
    return tuple(_int(v, what) for v in values)


def _no_hooks(hooks) -> None:
    # torch never saves hooks (an empty OrderedDict stands in for them); a
    # non-empty one would be called at backward time
    if type(hooks) not in (OrderedDict, dict) or hooks:
        raise _Malformed(f'backward hooks must be empty, got {hooks!r}')


def _tensor(storage, offset, size, stride, requires_grad,
            dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing ``storage``, all of it inside the storage."""
    if type(storage) is not _Storage:
        raise _Malformed(f'a tensor needs a storage of the file, got '
                         f'{type(storage).__name__}')
    if dtype not in TENSOR_DTYPES:
        raise _Malformed(f'tensors of dtype {dtype} are not read')
    offset = _int(offset, 'storage offset')
    size, stride = _ints(size, 'size'), _ints(stride, 'stride')
    if len(size) != len(stride) or type(requires_grad) is not bool:
        raise _Malformed('malformed tensor: size, stride or requires_grad')
    itemsize = torch.empty(0, dtype=dtype).element_size()
    numel = math.prod(size)
    if numel >= MAX_NUMEL:
        raise _Malformed(f'tensor of size {size}: too many elements')
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if numel and (last + 1) * itemsize > storage.data.nbytes():
        raise _Malformed(f'tensor of size {size} and stride {stride} at '
                         f'offset {offset} reaches past its storage of '
                         f'{storage.data.nbytes()} bytes')
    tensor = torch.empty(0, dtype=dtype, device=storage.data.device)
    tensor.set_(storage.data, offset, size, stride)
    return tensor.requires_grad_(requires_grad)


def _rebuild_tensor_v2(reader, args):
    storage, offset, size, stride, requires_grad, hooks, *metadata = args
    _no_hooks(hooks)
    if metadata not in ([], [{}]) or type(storage) is not _Storage or (
            storage.dtype is None):
        raise _Malformed('malformed tensor (metadata or untyped storage)')
    return _tensor(storage, offset, size, stride, requires_grad,
                   storage.dtype)


def _rebuild_tensor_v3(reader, args):
    storage, offset, size, stride, requires_grad, hooks, dtype, *metadata = (
        args)
    _no_hooks(hooks)
    if metadata not in ([], [{}]) or type(dtype) is not torch.dtype:
        raise _Malformed('malformed tensor (metadata or dtype)')
    return _tensor(storage, offset, size, stride, requires_grad, dtype)


def _rebuild_parameter(reader, args):
    data, requires_grad, hooks = args
    _no_hooks(hooks)
    if type(data) is not torch.Tensor or type(requires_grad) is not bool:
        raise _Malformed('malformed parameter')
    return torch.nn.Parameter(data, requires_grad)


def _empty_args(value):
    def build(reader, args):
        if args != ():
            raise _Malformed(f'expected no arguments, got {args!r}')
        return value()

    return build


def _ordered_dict(reader, args):
    ordered = _empty_args(OrderedDict)(reader, args)
    reader.expect_state(ordered, _ordered_dict_state)
    return ordered


def _ordered_dict_state(reader, ordered, state):
    # a module's state_dict() carries its modules' versions as _metadata,
    # which load_state_dict passes on (BatchNorm's, for one, reads it)
    if type(state) is not dict or set(state) != {'_metadata'} or type(
            state['_metadata']) not in (dict, OrderedDict):
        raise _refused(reader.path, f'OrderedDict state {state!r:.200}')
    ordered._metadata = state['_metadata']


def _counter(reader, args):
    # MultiStepLR's state: milestones = Counter({step: count})
    counts = args[0] if args else {}
    if len(args) > 1 or type(counts) is not dict or any(
            type(count) is not int for count in counts.values()):
        raise _Malformed(f'Counter takes a dict of counts, got {args!r:.200}')
    for key in counts:
        _check_key(key)
    return Counter(counts)


def _collection(kind):
    def build(reader, args):
        items = list(args[0]) if args else []
        if len(args) > 1 or (args and type(args[0]) is not list):
            raise _Malformed(f'{kind.__name__} takes a list, got {args!r}')
        for item in items:
            _check_key(item)
        return kind(items)

    return build


def _encode(reader, args):
    # protocol 2 pickles bytes as _codecs.encode(text, 'latin1')
    text, encoding = args
    if type(text) is not str or encoding not in ('latin1', 'latin-1'):
        raise _Malformed(f'_codecs.encode only decodes latin1, got {args!r}')
    return text.encode('latin1')


def _size(reader, args):
    (sizes, ) = args
    return torch.Size(_ints(sizes, 'torch.Size'))


def _device(reader, args):
    if not 1 <= len(args) <= 2 or type(args[0]) is not str or (
            len(args) == 2 and type(args[1]) is not int):
        raise _Malformed(f'malformed torch.device{args!r}')
    return torch.device(*args)


def _statistics_method(reader, args):
    owner, name = args
    if owner is not _HISTORY_BUFFER or name not in HISTORY_STATISTICS:
        shown = ', '.join(
            a.qualname if type(a) in (_Global, _ForeignGlobal) else
            f'{a!r:.100}' for a in args)
        raise _refused(reader.path, f'getattr({shown})')
    return _StatisticsMethod(name)


def _numpy_dtype(reader, args):
    # numpy pickles a dtype as dtype(name, False, True): copy=True makes a
    # new object, so its BUILD cannot touch numpy's shared dtype instances
    if args[1:] != (False, True) or args[0] not in NUMPY_DTYPES:
        raise _Malformed(f'numpy dtypes are read for numbers only, got '
                         f'dtype{args!r}')
    dtype = np.dtype(args[0], False, True)
    reader.expect_state(dtype, _numpy_dtype_state)
    reader.dtypes.add(id(dtype))
    return dtype


def _numpy_dtype_state(reader, dtype, state):
    # only the byte order may differ from the dtype's own state: a crafted
    # size, alignment or field table corrupts memory on access
    own = dtype.__reduce__()[2]
    if (type(state) is not tuple or len(state) != len(own)
            or state[1] not in ('<', '>', '|', '=')
            or any(type(a) is not type(b) or a != b
                   for i, (a, b) in enumerate(zip(state, own)) if i != 1)):
        raise _Malformed(f'malformed numpy dtype state {state!r}')
    dtype.__setstate__(state)


def _vetted_dtype(reader, dtype) -> np.dtype:
    if not isinstance(dtype, np.dtype) or id(dtype) not in reader.dtypes:
        raise _Malformed(f'numpy dtype {dtype!r} was not read from the file')
    return dtype


def _numpy_array(reader, args):
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and then
    # sets its state
    if len(args) != 3 or args[0] is not _NDARRAY or (
            args[1:] != ((0, ), b'b')):
        raise _Malformed(f'malformed numpy array {args!r}')
    array = np.empty(0, dtype=np.uint8)
    reader.expect_state(array, _numpy_array_state)
    reader.arrays.add(id(array))
    return array


def _numpy_array_state(reader, array, state):
    version, shape, dtype, fortran, data = state
    shape = _ints(shape, 'numpy shape')
    dtype = _vetted_dtype(reader, dtype)
    if version != 1 or type(fortran) is not bool or type(data) is not bytes:
        raise _Malformed('malformed numpy array state')
    if len(data) != math.prod(shape) * dtype.itemsize:
        raise _Malformed(f'numpy array of shape {shape} and dtype {dtype} '
                         f'with {len(data)} bytes')
    array.__setstate__((version, shape, dtype, fortran, data))


def _numpy_scalar(reader, args):
    dtype, data = args
    dtype = _vetted_dtype(reader, dtype)
    if type(data) is not bytes or len(data) != dtype.itemsize:
        raise _Malformed(f'malformed numpy scalar of dtype {dtype}')
    return np.frombuffer(data, dtype=dtype)[0]


def _new_history_buffer(reader, args):
    if args != ():
        raise _Malformed(f'HistoryBuffer takes no arguments, got {args!r}')
    # made without __init__ and given its state without __setstate__:
    # HistoryBuffer.__setstate__ writes the class's statistics methods
    buffer = HistoryBuffer.__new__(HistoryBuffer)
    reader.expect_state(buffer, _history_buffer_state)
    return buffer


def _history_buffer_state(reader, buffer, state):
    if type(state) is not dict or not (
            HISTORY_STATE_KEYS <= set(state) <=
            HISTORY_STATE_KEYS | {'statistics_methods'}):
        raise _Malformed(f'malformed HistoryBuffer state {state!r:.200}')
    methods = state.get('statistics_methods', {})
    # saved as {name: getattr(HistoryBuffer, name)}: the class's own methods,
    # which it has anyway
    if type(methods) is not dict or any(
            type(v) is not _StatisticsMethod or v.name != k
            for k, v in methods.items()):
        raise _refused(reader.path,
                       f'HistoryBuffer statistics methods {methods!r}')
    logs, counts = state['_log_history'], state['_count_history']
    if not (id(logs) in reader.arrays and id(counts) in reader.arrays
            and logs.ndim == counts.ndim == 1 and len(logs) == len(counts)):
        raise _Malformed('malformed HistoryBuffer histories')
    buffer.__dict__.update(
        max_length=_int(state['max_length'], 'max_length', 1),
        _log_history=logs,
        _count_history=counts)


def _new_foreign(reader, cls, args):
    obj = ForeignObject(cls.qualname, args)
    reader.expect_state(obj, _foreign_state)
    return obj


def _foreign_state(reader, obj, state):
    obj.pickled_state = state


# Markers that are only ever arguments of the constructors above.
_NDARRAY = _Global('numpy.ndarray')
_HISTORY_BUFFER = _Global(
    'mmengine.logging.history_buffer.HistoryBuffer', new=_new_history_buffer)


def _allowlist() -> Dict[tuple, Any]:
    """(module, name) -> what GLOBAL module.name resolves to."""
    table = {
        ('collections', 'OrderedDict'):
        _Global('collections.OrderedDict', _ordered_dict),
        ('collections', 'Counter'): _Global('collections.Counter', _counter),
        ('torch._utils', '_rebuild_tensor_v2'):
        _Global('torch._utils._rebuild_tensor_v2', _rebuild_tensor_v2),
        ('torch._utils', '_rebuild_tensor_v3'):
        _Global('torch._utils._rebuild_tensor_v3', _rebuild_tensor_v3),
        ('torch._utils', '_rebuild_parameter'):
        _Global('torch._utils._rebuild_parameter', _rebuild_parameter),
        ('torch', 'Size'): _Global('torch.Size', _size),
        ('torch', 'device'): _Global('torch.device', _device),
        ('builtins', 'set'): _Global('set', _collection(set)),
        ('builtins', 'frozenset'):
        _Global('frozenset', _collection(frozenset)),
        ('builtins', 'bytes'): _Global('bytes', _empty_args(bytes)),
        ('builtins', 'getattr'): _Global('getattr', _statistics_method),
        ('_codecs', 'encode'): _Global('_codecs.encode', _encode),
        ('numpy', 'dtype'): _Global('numpy.dtype', _numpy_dtype),
        ('numpy', 'ndarray'): _NDARRAY,
        ('mmengine.logging.history_buffer', 'HistoryBuffer'): _HISTORY_BUFFER,
    }
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        table[module, '_reconstruct'] = _Global(f'{module}._reconstruct',
                                                _numpy_array)
        table[module, 'scalar'] = _Global(f'{module}.scalar', _numpy_scalar)
    for name in dir(torch):  # dtypes pickle as torch.<name>
        if isinstance(getattr(torch, name), torch.dtype):
            table['torch', name] = getattr(torch, name)
    for name, dtype in STORAGE_TYPES.items():
        table['torch', name] = _StorageType(dtype)
    table['torch.storage', 'UntypedStorage'] = _StorageType(None)
    # protocol 2 names builtins as in Python 2
    table.update({('__builtin__', name): value
                  for (module, name), value in list(table.items())
                  if module == 'builtins'})
    return table


_ALLOWED = _allowlist()


def _unpickle(stream, path: str, load_storage=None) -> Any:
    """Run one pickle of ``stream`` through :class:`_RestrictedUnpickler`."""
    return _RestrictedUnpickler(stream, path, load_storage).load_checked()


class _UnlistedOpcode(pickle.UnpicklingError):
    """An opcode that :class:`_RestrictedUnpickler` does not run."""


class _Dispatch(dict):
    """Opcode -> handler; an opcode that is not listed is refused."""

    def __missing__(self, opcode: int):
        raise _UnlistedOpcode(f'pickle opcode {bytes([opcode])!r}')


# The opcodes that only move data (numbers, strings, empty containers,
# lists, the memo), handled by the standard library's pure-Python unpickler.
# GLOBAL and STACK_GLOBAL go through find_class, BINPERSID through
# persistent_load. Not listed, so refused: INST and OBJ (protocol 0/1 class
# calls), EXT1/2/4 (copyreg's extension registry), PERSID, and out-of-band
# buffers.
_DATA_OPCODES = (
    pickle.PROTO, pickle.FRAME, pickle.STOP, pickle.MARK, pickle.POP,
    pickle.POP_MARK, pickle.DUP, pickle.NONE, pickle.NEWTRUE, pickle.NEWFALSE,
    pickle.INT, pickle.BININT, pickle.BININT1, pickle.BININT2, pickle.LONG,
    pickle.LONG1, pickle.LONG4, pickle.FLOAT, pickle.BINFLOAT, pickle.STRING,
    pickle.BINSTRING, pickle.SHORT_BINSTRING, pickle.UNICODE,
    pickle.BINUNICODE, pickle.SHORT_BINUNICODE, pickle.BINUNICODE8,
    pickle.BINBYTES, pickle.SHORT_BINBYTES, pickle.BINBYTES8,
    pickle.BYTEARRAY8, pickle.EMPTY_TUPLE, pickle.EMPTY_LIST, pickle.LIST,
    pickle.EMPTY_DICT, pickle.EMPTY_SET, pickle.GET, pickle.BINGET,
    pickle.LONG_BINGET, pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT,
    pickle.MEMOIZE, pickle.GLOBAL, pickle.STACK_GLOBAL, pickle.BINPERSID)


class _RestrictedUnpickler(pickle._Unpickler):
    """Runs one pickle of a checkpoint with the table of globals
    :data:`_ALLOWED` (see the module docstring); the opcodes that call,
    instantiate, add items or make tuples are its own."""

    def __init__(self, stream, path: str, load_storage=None):
        super().__init__(stream, encoding='utf-8')
        self.path = path
        # (key, nbytes, itemsize, location) -> the storage's bytes; None:
        # persistent ids are refused
        self.load_storage = load_storage
        self.storages: Dict[str, torch.UntypedStorage] = {}
        # objects made here that one BUILD may complete: id -> (obj, check)
        self.awaiting_state: Dict[int, tuple] = {}
        self.dtypes, self.arrays = set(), set()
        self.tuple_depths: Dict[int, int] = {}
        self.made = []  # keeps every object above alive, so ids stay unique

    def load_checked(self) -> Any:
        try:
            return self.load()
        except CheckpointError:
            raise
        except _UnlistedOpcode as error:
            raise _refused(self.path, str(error)) from None
        except _Malformed as error:
            raise CheckpointError(
                f'{self.path}: refused a malformed object ({error}): not as '
                'torch.save, numpy or mmengine write it; nothing of it was '
                'used. Re-download the file, or re-save it where it was '
                'made.') from None
        except Exception as error:  # a malformed pickle, in any way
            raise CheckpointError(
                f'{self.path}: not a PyTorch checkpoint, or truncated: '
                f're-download it (unreadable pickle: {error!r})') from None

    def expect_state(self, obj, check: Callable) -> None:
        self.made.append(obj)
        self.awaiting_state[id(obj)] = (obj, check)

    def find_class(self, module: str, name: str):
        if '.' in name:  # would walk attributes: torch._utils.x.__globals__
            raise _refused(self.path, f'global {module}.{name}')
        value = _ALLOWED.get((module, name))
        return _ForeignGlobal(f'{module}.{name}') if value is None else value

    def persistent_load(self, pid):
        # ('storage', type, key, location, numel), and in legacy files a
        # sixth item, None (storage views of torch < 0.4 are not read)
        if self.load_storage is None or type(pid) is not tuple or len(
                pid) not in (5, 6) or pid[0] != 'storage' or pid[5:] not in (
                    (), (None, )):
            raise _Malformed(f'unexpected persistent id {pid!r:.200}')
        _, storage_type, key, location, numel = pid[:5]
        if type(storage_type) is not _StorageType or type(key) is not str or (
                type(location) is not str):
            raise _Malformed(f'malformed storage id {pid!r:.200}')
        dtype = storage_type.dtype
        if key not in self.storages:
            itemsize = torch.empty(
                0, dtype=dtype or torch.uint8).element_size()
            self.storages[key] = self.load_storage(
                key, _int(numel, 'numel') * itemsize, itemsize, location)
        return _Storage(self.storages[key], dtype)

    # -- the opcodes that call, instantiate or mutate --------------------

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if type(func) is _ForeignGlobal or type(func) is _Global and (
                func.build is None):
            raise _refused(self.path, _describe(func))
        if type(func) is not _Global:
            raise _refused(self.path, f'call of {_describe(func)}')
        if type(args) is not tuple:
            raise _Malformed('REDUCE needs a tuple of arguments')
        self.stack[-1] = func.build(self, args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, args))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if type(kwargs) is not dict or kwargs:
            raise _refused(self.path,
                           f'keyword arguments for {_describe(cls)}')
        self.append(self._new(cls, args))

    def _new(self, cls, args):
        if type(args) is not tuple:
            raise _Malformed('NEWOBJ needs a tuple of arguments')
        if type(cls) is _ForeignGlobal:
            return _new_foreign(self, cls, args)
        if type(cls) is _Global and cls.new is not None:
            return cls.new(self, args)
        raise _refused(self.path, f'instance of {_describe(cls)}')

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        obj, check = self.awaiting_state.pop(id(inst), (None, None))
        if obj is not inst:
            raise _refused(self.path, f'state for {_describe(inst)}')
        check(self, inst, state)

    def load_tuple(self):
        self._push_tuple(self.pop_mark())

    def load_tuple1(self):
        self._push_tuple([self.stack.pop()])

    def load_tuple2(self):
        self._push_tuple(self._pop(2))

    def load_tuple3(self):
        self._push_tuple(self._pop(3))

    def _pop(self, n: int) -> list:
        if len(self.stack) < n:
            raise _Malformed('the pickle stack ran short')
        items = self.stack[-n:]
        del self.stack[-n:]
        return items

    def _push_tuple(self, items):
        depth = 1 + max((self.tuple_depths.get(id(item), 1)
                         for item in items if type(item) is tuple), default=0)
        if depth > MAX_TUPLE_DEPTH:
            raise _Malformed(f'tuples nested deeper than {MAX_TUPLE_DEPTH}')
        made = tuple(items)
        self.made.append(made)
        self.tuple_depths[id(made)] = depth
        self.append(made)

    def load_append(self):
        self._extend([self.stack.pop()])

    def load_appends(self):
        self._extend(self.pop_mark())

    def _extend(self, items):
        target = self.stack[-1]
        if type(target) is not list:
            raise _refused(self.path, f'items for a {type(target).__name__}')
        target.extend(items)

    def load_setitem(self):
        value = self.stack.pop()
        key = self.stack.pop()
        self._set_items([key, value])

    def load_setitems(self):
        self._set_items(self.pop_mark())

    def _set_items(self, items):
        target = self.stack[-1]
        if type(target) not in (dict, OrderedDict, ForeignObject):
            raise _refused(self.path, f'items for a {type(target).__name__}')
        for i in range(0, len(items), 2):
            _check_key(items[i])
            target[items[i]] = items[i + 1]

    def load_dict(self):
        items = self.pop_mark()
        self.append({})
        self._set_items(items)

    def load_additems(self):
        items = self.pop_mark()
        target = self.stack[-1]
        if type(target) is not set:
            raise _refused(self.path, f'items for a {type(target).__name__}')
        for item in items:
            _check_key(item)
        target.update(items)

    def load_frozenset(self):
        items = self.pop_mark()
        for item in items:
            _check_key(item)
        self.append(frozenset(items))

    dispatch = _Dispatch({
        **{op[0]: pickle._Unpickler.dispatch[op[0]]
           for op in _DATA_OPCODES},
        pickle.TUPLE[0]: load_tuple,
        pickle.TUPLE1[0]: load_tuple1,
        pickle.TUPLE2[0]: load_tuple2,
        pickle.TUPLE3[0]: load_tuple3,
        pickle.REDUCE[0]: load_reduce,
        pickle.NEWOBJ[0]: load_newobj,
        pickle.NEWOBJ_EX[0]: load_newobj_ex,
        pickle.BUILD[0]: load_build,
        pickle.APPEND[0]: load_append,
        pickle.APPENDS[0]: load_appends,
        pickle.SETITEM[0]: load_setitem,
        pickle.SETITEMS[0]: load_setitems,
        pickle.DICT[0]: load_dict,
        pickle.ADDITEMS[0]: load_additems,
        pickle.FROZENSET[0]: load_frozenset,
    })


# ---------------------------------------------------------------------------
# mmengine's loads


def load_from_local(filename: str, map_location=None) -> Any:
    """mmengine's loader of local paths, reading through this module."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    return read_checkpoint(filename, map_location)


def load_from_http(url: str, map_location=None) -> Any:
    """mmengine's loader of http(s) URLs: downloaded once into the cache,
    then read through this module."""
    return read_checkpoint(
        download(url, check=check_complete, hint=MMENGINE_HINT), map_location)


def register_mmengine_loaders() -> None:
    """Make mmengine read local files and http(s) URLs through this module
    (``load_from``, ``--resume``, ``load_checkpoint``, ``init_detector``,
    ``init_model``, the inferencers: all go through its CheckpointLoader)."""
    from mmengine.runner.checkpoint import CheckpointLoader
    CheckpointLoader.register_scheme('', load_from_local, force=True)
    CheckpointLoader.register_scheme(('http://', 'https://'),
                                     load_from_http,
                                     force=True)


# ---------------------------------------------------------------------------
# Picking the weights


def select_state_dict(checkpoint: dict, state: str = 'model',
                      prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The weights of an authors', mmengine or plain checkpoint: ``model``
    (or ``state_dict_ema`` for ``state='ema'``), else ``state_dict``, else
    the checkpoint itself; with ``prefix``, only the keys under it, without
    it."""
    if state not in STATE_KEYS:
        raise ValueError(f"state must be one of {sorted(STATE_KEYS)}, got "
                         f'{state!r}')
    if not isinstance(checkpoint, dict):
        raise TypeError(f'The checkpoint holds a {type(checkpoint).__name__}, '
                        'not a dict of weights')
    key = STATE_KEYS[state]
    if key in checkpoint:
        state_dict = checkpoint[key]
    elif state == 'ema':
        raise KeyError("pretrained_state='ema' but the checkpoint has no "
                       "'state_dict_ema' (keys: "
                       f"{sorted(map(str, checkpoint))}); use "
                       "pretrained_state='model'")
    elif 'state_dict' in checkpoint:  # mmengine / mmdet / mmseg files
        state_dict = checkpoint['state_dict']
    elif checkpoint and type(checkpoint) is not ForeignObject and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict = checkpoint  # a plain state dict
    else:
        got = f'keys {sorted(map(str, checkpoint))}'
        if isinstance(checkpoint, ForeignObject):
            got = f'a pickled {checkpoint.pickled_class}'
        raise KeyError(f'No weights found in checkpoint: expected {key!r} or '
                       f"'state_dict', got {got}")
    if prefix:
        prefix = prefix if prefix.endswith('.') else prefix + '.'
        state_dict = {
            k[len(prefix):]: v
            for k, v in state_dict.items() if k.startswith(prefix)
        }
        if not state_dict:
            raise KeyError(f'No key of the checkpoint starts with {prefix!r}')
    return state_dict
