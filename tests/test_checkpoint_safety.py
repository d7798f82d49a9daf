"""Crafted checkpoint files are refused or inert through every route that
opens a checkpoint in a process that imported mmvit3; genuine files load.

The corpus is generated here; ``checkpoint_probe.py`` opens all of it
through one route per fresh process and reports, per file, the outcome, the
marker files the attacks would write, and any process state that changed.
A control run shows that each attack does work on the loader it targets.
"""
import contextlib
import json
import os
import os.path as osp
import pickle
import re
import struct
import subprocess
import sys
import types
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.optim import LinearLR, MultiStepLR, OptimWrapper, PolyLR

from mmvit3.checkpoint import (CheckpointError, ForeignObject, load_file,
                               read_checkpoint)
from mmvit3.testing import write_published_checkpoint

PROBE = osp.join(osp.dirname(osp.abspath(__file__)), 'checkpoint_probe.py')
REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

# ---------------------------------------------------------------------------
# Writing pickles by hand

P = pickle


def p_str(text: str) -> bytes:
    data = text.encode()
    return P.BINUNICODE + struct.pack('<I', len(data)) + data


def p_int(value: int) -> bytes:
    return pickle.dumps(value, 2)[2:-1]


def p_global(module: str, name: str) -> bytes:
    return P.GLOBAL + f'{module}\n{name}\n'.encode()


def p_tuple(*items: bytes) -> bytes:
    return P.MARK + b''.join(items) + P.TUPLE


def p_call(func: bytes, *args: bytes) -> bytes:
    return func + p_tuple(*args) + P.REDUCE


def p_dict(*pairs: bytes) -> bytes:
    return P.EMPTY_DICT + P.MARK + b''.join(pairs) + P.SETITEMS


def p_obj(obj) -> bytes:
    """A genuine object, as protocol 2 pickles it (memo slots are reused
    across pieces, each piece writing before it reads)."""
    return pickle.dumps(obj, 2)[2:-1]


def p_storage(key: str, numel: int, kind: str = 'FloatStorage') -> bytes:
    return (P.MARK + p_str('storage') + p_global('torch', kind) + p_str(key) +
            p_str('cpu') + p_int(numel) + P.TUPLE + P.BINPERSID)


def p_tensor(storage: bytes, size: int, hooks: bytes = None) -> bytes:
    hooks = hooks or p_call(p_global('collections', 'OrderedDict'))
    return p_call(
        p_global('torch._utils', '_rebuild_tensor_v2'), storage, p_int(0),
        p_tuple(p_int(size)), p_tuple(p_int(1)), P.NEWFALSE, hooks)


def pickle_bytes(*body: bytes, protocol: int = 2) -> bytes:
    return P.PROTO + bytes([protocol]) + b''.join(body) + P.STOP


def write_torch_zip(path: str, data_pkl: bytes, storages=None,
                    compression=zipfile.ZIP_STORED):
    """A zip archive laid out as torch.save writes one, around ``data_pkl``."""
    with zipfile.ZipFile(path, 'w', compression) as archive:
        archive.writestr('archive/data.pkl', data_pkl)
        archive.writestr('archive/byteorder', 'little')
        for key, data in (storages or {}).items():
            archive.writestr(f'archive/data/{key}', data)
        archive.writestr('archive/version', '3\n')


class Call:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch(marker: str) -> str:
    return f'open({marker!r}, "w").close()'


# ---------------------------------------------------------------------------
# Genuine files


class YacsCfgNode(dict):
    """Pickles as the authors' yacs ``CfgNode``: a dict with its flags in
    ``__dict__`` (a set and a dict of tuples among them)."""

    def __init__(self, init=None):
        super().__init__(init or {})
        self.__dict__.update({
            '__immutable__': True,
            '__deprecated_keys__': set(),
            '__renamed_keys__': {'MODEL.OLD': ('MODEL.NEW', 'renamed')},
            '__new_allowed__': False,
        })


@contextlib.contextmanager
def pickled_as(cls, module: str, name: str):
    """Pickle ``cls`` under ``module.name``, a module that does not exist
    when the file is read back."""
    parts = module.split('.')
    packages = ['.'.join(parts[:i + 1]) for i in range(len(parts))]
    assert not any(p in sys.modules for p in packages)
    sys.modules.update({p: types.ModuleType(p) for p in packages})
    setattr(sys.modules[module], name, cls)
    saved = cls.__module__, cls.__qualname__
    cls.__module__, cls.__qualname__ = module, name
    try:
        yield
    finally:
        cls.__module__, cls.__qualname__ = saved
        for package in packages:
            del sys.modules[package]


def write_authors_imagenet(path: str) -> None:
    """An ImageNet file as the authors' training script writes it, with its
    yacs config (EMA weights left out, to keep the file small)."""
    states = write_published_checkpoint(path, 'tiny', with_ema=False,
                                        with_training_state=False)
    config = YacsCfgNode({'MODEL': YacsCfgNode({'TYPE': 'hvit3'}),
                          'TRAIN': YacsCfgNode({'EPOCHS': 300})})
    with pickled_as(YacsCfgNode, 'yacs.config', 'CfgNode'):
        torch.save(dict(states, optimizer={'state': {}, 'param_groups': []},
                        lr_scheduler={'last_epoch': 300}, epoch=299,
                        max_accuracy=84.0, config=config), path)


def message_hub_state() -> dict:
    hub = MessageHub(f'probe-{id(object())}')
    for step in range(3):
        hub.update_scalar('train/loss', 1.0 / (step + 1))
        hub.update_scalar('train/lr', 2e-4)
    hub.update_info('eta', np.float64(12.5))
    hub.update_info('iter', 3)
    return hub.state_dict()


def write_mmengine_checkpoint(path: str) -> dict:
    """A checkpoint with the parts mmengine's runner saves."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3),
                                torch.nn.BatchNorm2d(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    # the schedulers of the published recipes
    wrapper = OptimWrapper(optimizer)
    schedulers = [
        LinearLR(wrapper, start_factor=0.001, by_epoch=False, begin=0,
                 end=10),
        MultiStepLR(wrapper, milestones=[8, 11], gamma=0.1),
        PolyLR(wrapper, eta_min=0., power=1.0, begin=10, end=100,
               by_epoch=False),
    ]
    checkpoint = {
        'meta': {'epoch': 1, 'iter': 3, 'seed': 0,
                 'mmengine_version': '0.10.7',
                 'dataset_meta': {'classes': ('a', 'b'),
                                  'palette': [(1, 2, 3), (4, 5, 6)]}},
        'state_dict': model.state_dict(),
        'message_hub': message_hub_state(),
        'optimizer': optimizer.state_dict(),
        'param_schedulers': [s.state_dict() for s in schedulers],
    }
    torch.save(checkpoint, path)
    return checkpoint


# ---------------------------------------------------------------------------
# The corpus: name -> how to write it, and what the reader must say


class Entry(NamedTuple):
    kind: str  # 'attack', 'inert', 'broken' or 'genuine'
    write: Callable[[str, str], None]  # (path, marker path)
    expect: str = 'loaded'  # regex of the reader's error, or 'loaded'
    control: str = ''  # the unsafe loader the attack works on
    skip: tuple = ()  # routes that do not apply


def _legacy_exec(path, marker):
    torch.save({'model': {}, 'x': Call(exec, touch(marker))}, path,
               _use_new_zipfile_serialization=False)


def _raw_pickle(path, marker):
    with open(path, 'wb') as f:
        pickle.dump(Call(os.system, f'touch {marker}'), f, protocol=4)


def _dotted_walk(path, marker):
    # passes a find_class that checks only the module and a _rebuild_ prefix
    write_torch_zip(path, pickle_bytes(
        p_str('torch._utils'), p_str('_rebuild_tensor.__builtins__.get'),
        P.STACK_GLOBAL, p_tuple(p_str('exec')), P.REDUCE,
        p_tuple(p_str(touch(marker))), P.REDUCE, protocol=4))


class WritesOnLoad(torch.nn.Module):
    """A TorchScript module whose __setstate__ maps (creating) a file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.buffer = torch.zeros(8, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self):
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]):
        self.path = state[0]
        self.training = state[1]
        self.buffer = torch.from_file(self.path, shared=True, size=8,
                                      dtype=torch.uint8)

    def forward(self, x):
        return x


def _torchscript(path, marker):
    torch.jit.save(torch.jit.script(WritesOnLoad(marker)), path)


def _set_grad_enabled(path, marker):
    write_torch_zip(path, pickle_bytes(
        p_call(p_global('torch', 'set_grad_enabled'), P.NEWFALSE)))


def _class_attribute(path, marker):
    # BUILD with a slot state on a class: setattr(torch.no_grad, ...)
    write_torch_zip(path, pickle_bytes(
        p_global('torch', 'no_grad'), P.NONE,
        p_dict(p_str('mmvit3_probe'), p_int(1)), P.TUPLE2, P.BUILD))


def _file_writer(path, marker):
    write_torch_zip(path, pickle_bytes(
        p_call(p_global('torch', 'PyTorchFileWriter'), p_str(marker))))


def _os_system(path, marker):
    torch.save({'model': {}, 'config': Call(os.system, f'touch {marker}')},
               path)


GETATTR = p_global('builtins', 'getattr')


def _getattr_exec(path, marker):
    builtins_module = p_call(GETATTR, GETATTR, p_str('__self__'))
    exec_ = p_call(GETATTR, builtins_module, p_str('exec'))
    write_torch_zip(path, pickle_bytes(p_call(
        p_global('torch._tensor', '_rebuild_from_type_v2'), exec_,
        p_global('torch', 'Tensor'), p_tuple(p_str(touch(marker))),
        P.EMPTY_DICT)))


def _globals_setitem(path, marker):
    module_globals = p_call(GETATTR,
                            p_global('torch._utils', '_rebuild_tensor_v2'),
                            p_str('__globals__'))
    write_torch_zip(path, pickle_bytes(
        module_globals, p_str('mmvit3_probe'), p_int(1), P.SETITEM))


NUMPY_DTYPE = p_global('numpy', 'dtype')
# where numpy's pickles name their reconstructors (numpy 2: numpy._core)
NUMPY_CORE = np.empty(0).__reduce__()[0].__module__


def p_numpy_array(dtype: bytes, shape: int, data: bytes) -> bytes:
    return p_call(
        p_global(NUMPY_CORE, '_reconstruct'),
        p_global('numpy', 'ndarray'), p_tuple(p_int(0)), p_obj(b'b')) + (
            p_tuple(p_int(1), p_tuple(p_int(shape)), dtype, P.NEWFALSE,
                    p_obj(data)) + P.BUILD)


def _numpy_dtype_fields(path, marker):
    # a float64 with a field 256 MiB past its 8 bytes: reading it crashes
    f8 = p_call(NUMPY_DTYPE, p_str('f8'), P.NEWFALSE, P.NEWTRUE)
    state = p_tuple(p_int(3), p_str('<'), P.NONE, p_tuple(p_str('a')),
                    p_dict(p_str('a'), p_tuple(f8, p_int(1 << 28))), p_int(8),
                    p_int(1), p_int(16))
    write_torch_zip(path, pickle_bytes(
        p_numpy_array(f8 + state + P.BUILD, 1, b'\0' * 8)))


def _numpy_shared_dtype(path, marker):
    # copy=False hands the BUILD numpy's shared float64 dtype (which this
    # numpy happens to protect)
    write_torch_zip(path, pickle_bytes(
        p_call(NUMPY_DTYPE, p_str('f8'), P.NEWFALSE, P.NEWFALSE),
        p_tuple(p_int(3), p_str('>'), P.NONE, P.NONE, P.NONE, p_int(-1),
                p_int(-1), p_int(0)), P.BUILD))


def _object_array(path, marker):
    dtype = p_call(NUMPY_DTYPE, p_str('O8'), P.NEWFALSE, P.NEWTRUE)
    write_torch_zip(path, pickle_bytes(p_call(
        p_global(NUMPY_CORE, '_reconstruct'),
        p_global('numpy', 'ndarray'), p_tuple(p_int(0)), p_obj(b'b')) +
        p_tuple(p_int(1), p_tuple(p_int(1)), dtype, P.NEWFALSE,
                P.EMPTY_LIST + p_global('builtins', 'exec') + P.APPEND) +
        P.BUILD))


def _history_buffer_methods(path, marker):
    # HistoryBuffer.__setstate__ copies these into the class: 'mean' -> max
    buffer = p_global('mmengine.logging.history_buffer', 'HistoryBuffer')
    state = p_dict(
        p_str('max_length'), p_int(10),
        p_str('_log_history'), p_obj(np.array([1.0, 3.0])),
        p_str('_count_history'), p_obj(np.array([1, 1])),
        p_str('statistics_methods'),
        p_dict(p_str('mean'), p_call(GETATTR, buffer, p_str('max'))))
    write_torch_zip(path, pickle_bytes(
        buffer, P.EMPTY_TUPLE, P.NEWOBJ, state, P.BUILD))


def _tensor_out_of_bounds(path, marker):
    write_torch_zip(path, pickle_bytes(
        p_tensor(p_storage('0', 4), size=1 << 20)), {'0': b'\0' * 16})


def _storage_size(path, marker):
    write_torch_zip(path, pickle_bytes(
        p_tensor(p_storage('0', 1 << 40), size=4)), {'0': b'\0' * 16})


def _backward_hooks(path, marker):
    hooks = p_call(p_global('collections', 'OrderedDict')) + p_int(0) + (
        p_global('builtins', 'print') + P.SETITEM)
    write_torch_zip(path, pickle_bytes(
        p_tensor(p_storage('0', 4), size=4, hooks=hooks)), {'0': b'\0' * 16})


def _deep_key(path, marker):
    # hashing a tuple nested this deep overflows the C stack
    write_torch_zip(path, pickle_bytes(
        P.EMPTY_DICT, P.EMPTY_TUPLE, P.TUPLE1 * 200000, P.NONE, P.SETITEM))


def _deep_value(path, marker):
    # the same tuple as a value, hashed later by whoever uses it
    write_torch_zip(path, pickle_bytes(
        P.EMPTY_DICT, p_str('classes'), P.EMPTY_TUPLE, P.TUPLE1 * 200000,
        P.SETITEM))


def _sparse_tensor(path, marker):
    write_torch_zip(path, pickle_bytes(p_call(
        p_global('torch._utils', '_rebuild_sparse_tensor'), p_int(1),
        p_int(2))))


def _parameter_with_state(path, marker):
    write_torch_zip(path, pickle_bytes(p_call(
        p_global('torch._utils', '_rebuild_parameter_with_state'),
        p_tensor(p_storage('0', 4), size=4), P.NEWFALSE,
        p_call(p_global('collections', 'OrderedDict')),
        p_dict(p_str('__class__'), p_global('torch', 'no_grad')))),
        {'0': b'\0' * 16})


def _call_a_dtype(path, marker):
    write_torch_zip(path, pickle_bytes(p_call(p_global('torch', 'float32'))))


def _inst_opcode(path, marker):  # protocol 0: INST calls os.system
    write_torch_zip(path, f"(S'touch {marker}'\nios\nsystem\n.".encode())


def _ext_opcode(path, marker):  # copyreg's extension registry
    write_torch_zip(path, P.PROTO + b'\x02' + P.EXT1 + b'\x01' + P.STOP)


def _foreign_instance(path, marker):
    # created without __new__ or __init__, its state kept as data
    write_torch_zip(path, pickle_bytes(
        p_global('subprocess', 'Popen'), P.EMPTY_TUPLE, P.NEWOBJ,
        p_dict(p_str('args'), p_str(f'touch {marker}')), P.BUILD))


def _torch_class_instance(path, marker):
    write_torch_zip(path, pickle_bytes(
        p_global('torch', 'no_grad'), P.EMPTY_TUPLE, P.NEWOBJ,
        p_dict(p_str('prev'), P.NEWTRUE), P.BUILD))


def _html(path, marker):
    with open(path, 'w') as f:
        f.write('<!DOCTYPE html>\n<html><body>Sign in to download</body>'
                '</html>\n')


def _lfs_pointer(path, marker):
    with open(path, 'w') as f:
        f.write('version https://git-lfs.github.com/spec/v1\noid sha256:'
                f'{"0" * 64}\nsize 113975139\n')


def _empty(path, marker):
    open(path, 'wb').close()


def _truncated(path, marker):
    torch.save({'model': {'w': torch.randn(1000)}}, path)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) * 2 // 3])


def _truncated_legacy(path, marker):
    torch.save({'w': torch.randn(1000)}, path,
               _use_new_zipfile_serialization=False)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) - 100])


def _corrupt_record(path, marker):
    torch.save({'model': {'w': torch.zeros(1000)}}, path)
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    start = data.index(b'\0' * 4000)
    data[start + 100] = 1  # a flipped byte: its record's CRC no longer fits
    with open(path, 'wb') as f:
        f.write(data)


def _compressed(path, marker):
    write_torch_zip(path, pickle_bytes(p_dict()),
                    compression=zipfile.ZIP_DEFLATED)


def _other_model(path, marker):
    torch.save({'conv1.weight': torch.randn(8, 3, 7, 7),
                'fc.weight': torch.randn(10, 8)}, path)


REFUSED = 'this file contains code, not only weights'
MALFORMED = 'refused a malformed object'
TRUNCATED = 'not a PyTorch checkpoint, or truncated: re-download'

# The first entry also goes through tools/test.py end to end.
CORPUS = {
    'os_system': Entry('attack', _os_system,
                       rf'refused global (posix|os|nt)\.system: {REFUSED}',
                       control='torch_unsafe'),
    'legacy_exec': Entry('attack', _legacy_exec,
                         rf'refused global __builtin__\.exec: {REFUSED}',
                         control='torch_unsafe'),
    'raw_pickle': Entry('attack', _raw_pickle, TRUNCATED, control='pickle'),
    'dotted_walk': Entry(
        'attack', _dotted_walk,
        r'refused global torch\._utils\._rebuild_tensor\.__builtins__\.get',
        control='prefix_check'),
    'torchscript': Entry('attack', _torchscript, 'a TorchScript archive',
                         control='torch_unsafe'),
    'set_grad_enabled': Entry('attack', _set_grad_enabled,
                              r'refused global torch\.set_grad_enabled',
                              control='torch_unsafe'),
    'class_attribute': Entry('attack', _class_attribute,
                             r'refused state for global torch\.no_grad',
                             control='torch_unsafe'),
    'file_writer': Entry('attack', _file_writer,
                         r'refused global torch\.PyTorchFileWriter',
                         control='torch_unsafe'),
    'getattr_exec': Entry('attack', _getattr_exec,
                          r'refused getattr\(', control='old_allowlist'),
    'globals_setitem': Entry('attack', _globals_setitem, r'refused getattr\(',
                             control='old_allowlist'),
    'history_buffer_methods': Entry(
        'attack', _history_buffer_methods,
        'refused HistoryBuffer statistics methods',
        control='old_allowlist'),
    'numpy_shared_dtype': Entry('attack', _numpy_shared_dtype,
                                f'{MALFORMED}.*numpy dtypes'),
    'numpy_dtype_fields': Entry('attack', _numpy_dtype_fields,
                                f'{MALFORMED}.*numpy dtype state'),
    'object_array': Entry('attack', _object_array,
                          f'{MALFORMED}.*numpy dtypes'),
    'deep_key': Entry('attack', _deep_key,
                      f'{MALFORMED}.*tuples nested deeper than',
                      skip=('torch_load', )),  # plain torch crashes on it
    'deep_value': Entry('attack', _deep_value,
                        f'{MALFORMED}.*tuples nested deeper than'),
    'tensor_out_of_bounds': Entry('attack', _tensor_out_of_bounds,
                                  f'{MALFORMED}.*reaches past its storage'),
    'storage_size': Entry('attack', _storage_size,
                          f'{TRUNCATED}.*record data/0 holds 16 bytes'),
    'backward_hooks': Entry('attack', _backward_hooks,
                            f'{MALFORMED}.*backward hooks must be empty'),
    'sparse_tensor': Entry(
        'attack', _sparse_tensor,
        r'refused global torch\._utils\._rebuild_sparse_tensor'),
    'parameter_with_state': Entry(
        'attack', _parameter_with_state,
        r'refused global torch\._utils\._rebuild_parameter_with_state'),
    'call_a_dtype': Entry('attack', _call_a_dtype, 'refused call of a dtype'),
    'inst_opcode': Entry('attack', _inst_opcode,
                         "refused pickle opcode b'i'"),
    'ext_opcode': Entry('attack', _ext_opcode,
                        r"refused pickle opcode b'\\x82'"),
    'compressed': Entry('broken', _compressed, 'is compressed'),
    'foreign_instance': Entry('inert', _foreign_instance),
    'torch_class_instance': Entry('inert', _torch_class_instance),
    'html': Entry('broken', _html, 'an HTML page, not a checkpoint'),
    'lfs_pointer': Entry('broken', _lfs_pointer, 'a Git LFS pointer'),
    'empty': Entry('broken', _empty, TRUNCATED),
    'truncated': Entry('broken', _truncated, TRUNCATED),
    'truncated_legacy': Entry('broken', _truncated_legacy, TRUNCATED),
    'corrupt_record': Entry('broken', _corrupt_record,
                            f'{TRUNCATED}.*Bad CRC-32'),
    'other_model': Entry('genuine', _other_model),
    'published': Entry('genuine',
                       lambda path, marker: write_authors_imagenet(path)),
}

MMVIT3_ROUTES = ('load_file', 'backbone', 'timm', 'mmengine', 'tools')


@pytest.fixture(scope='module')
def corpus(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp('corpus')
    markers = directory / 'markers'
    markers.mkdir()
    entries = []
    for name, entry in CORPUS.items():
        path = str(directory / f'{name}.pth')
        entry.write(path, str(markers / name))
        entries.append(dict(name=name, file=path, kind=entry.kind,
                            control=entry.control, skip=list(entry.skip)))
    assert not os.listdir(markers), 'writing the corpus ran an attack'
    with open(directory / 'manifest.json', 'w') as f:
        json.dump(dict(entries=entries,
                       warmup=str(directory / 'published.pth')), f)
    return str(directory)


def probe(route: str, corpus: str, ade_root: str) -> tuple:
    """Run the probe of ``route``: (exit status, stdout, stderr)."""
    with open(osp.join(corpus, f'{route}.out'), 'w+') as out, open(
            osp.join(corpus, f'{route}.err'), 'w+') as err:
        status = subprocess.run(
            [sys.executable, PROBE, route, corpus, ade_root], cwd=REPO,
            stdout=out, stderr=err, timeout=600,
            env=dict(os.environ, PYTHONWARNINGS='ignore')).returncode
        out.seek(0)
        err.seek(0)
        return status, out.read(), err.read()


@pytest.fixture(scope='module')
def reports(corpus, shapes_data) -> dict:
    """Each route's report; three probes run at a time, the slowest first,
    then the control run ('unsafe'), which writes the markers."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = {route: pool.submit(probe, route, corpus, shapes_data['ade'])
                for route in ('tools', 'timm', 'backbone', 'torch_load',
                              'mmengine', 'load_file')}
    results = {route: run.result() for route, run in runs.items()}
    results['unsafe'] = probe('unsafe', corpus, shapes_data['ade'])
    return results


def report_of(reports: dict, route: str) -> dict:
    status, out, err = reports[route]
    assert status == 0, out[-3000:] + err[-5000:]
    return json.loads(out.strip().splitlines()[-1])


def untouched(report: dict) -> None:
    """No attack wrote its marker or changed the process."""
    for name, result in report['files'].items():
        assert not result['markers'], (name, result)
        assert not result['changed'], (name, result)


@pytest.mark.parametrize('route', MMVIT3_ROUTES)
def test_mmvit3_routes_refuse_the_corpus(route, reports):
    report = report_of(reports, route)
    untouched(report)
    files = report['files']
    for name, entry in CORPUS.items():
        outcome = files[name]['outcome']
        if entry.kind in ('attack', 'broken'):
            assert re.search(entry.expect, outcome), (name, outcome)
        elif route == 'load_file':
            assert outcome == 'loaded', (name, outcome)
    if route in ('load_file', 'backbone', 'timm'):
        assert files['published']['outcome'] == 'loaded'
    if route in ('backbone', 'timm'):
        assert 'no H-ViT3 weights' in files['other_model']['outcome']
    if route == 'tools':  # tools/test.py CONFIG <the first file>
        assert re.search(next(iter(CORPUS.values())).expect, report['tool'])


def test_plain_torch_load_after_import_refuses_the_corpus(reports):
    report = report_of(reports, 'torch_load')
    untouched(report)
    for name, entry in CORPUS.items():
        # plain torch loads the deep tuple value: the crash comes when
        # whoever uses it hashes it
        if entry.kind == 'attack' and name in report['files'] and (
                name != 'deep_value'):
            assert report['files'][name]['outcome'] != 'loaded', name


def test_the_attacks_work_on_the_loaders_they_target(reports):
    """Control: without mmvit3's reader each attack writes its marker or
    changes the process (so the refusals above are not vacuous)."""
    report = report_of(reports, 'unsafe')
    for name, entry in CORPUS.items():
        if entry.control:
            result = report['files'][name]
            assert name in result['markers'] or result['changed'], (name,
                                                                    result)


@pytest.mark.parametrize('name', ['numpy_dtype_fields', 'deep_key'])
def test_the_crashing_files_crash_unprotected_loaders(corpus, name):
    """Control: these two kill the interpreter (SIGSEGV) when loaded by
    torch with mmvit3's former allowlist, or by plain torch (a Python that
    bounds C recursion may raise RecursionError for the deep key instead)."""
    path = osp.join(corpus, f'{name}.pth')
    script = {
        'numpy_dtype_fields': (
            'import numpy, torch\n'
            f'from {NUMPY_CORE} import _reconstruct\n'
            'allowed = [numpy.dtype, numpy.ndarray, _reconstruct,\n'
            '           type(numpy.dtype("f8"))]\n'
            'with torch.serialization.safe_globals(allowed):\n'
            f'    array = torch.load({path!r})\n'
            'print(array["a"])\n'),
        'deep_key': f'import torch\ntorch.load({path!r})\n',
    }[name]
    result = subprocess.run([sys.executable, '-c', script],
                            capture_output=True, timeout=120)
    assert result.returncode == -11 or (
        name == 'deep_key' and b'RecursionError' in result.stderr), (
            result.returncode, result.stderr[-2000:])


def test_import_leaves_torch_allowlist_as_it_was():
    script = (
        'import torch, numpy, timm, mmengine.runner, mmengine.logging\n'
        'import mmdet.registry, mmseg.registry\n'
        'before = list(torch.serialization.get_safe_globals())\n'
        'import mmvit3\n'
        'after = list(torch.serialization.get_safe_globals())\n'
        'assert after == before, (before, after)\n'
        'assert getattr not in after\n')
    result = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# ---------------------------------------------------------------------------
# Genuine files, in this process


def test_authors_imagenet_file_loads_with_its_config_inert(corpus):
    path = osp.join(corpus, 'published.pth')
    checkpoint = load_file(path)
    assert 'yacs' not in sys.modules
    config = checkpoint.pop('config')
    assert isinstance(config, ForeignObject)
    assert config.pickled_class == 'yacs.config.CfgNode'
    assert config['MODEL']['TYPE'] == 'hvit3'
    assert config.pickled_state['__deprecated_keys__'] == set()
    with pytest.raises(Exception, match='yacs'):  # what torch.load says
        torch.load(path, weights_only=False)
    with pickled_as(YacsCfgNode, 'yacs.config', 'CfgNode'):
        saved = torch.load(path, weights_only=False)
    del saved['config']
    assert_same(checkpoint, saved)


def assert_same(loaded, saved, where='checkpoint'):
    """``loaded`` equals ``saved``: types, tensors (dtype, strides, grad),
    numpy arrays, HistoryBuffers and state-dict metadata included."""
    assert type(loaded) is type(saved), where
    if isinstance(saved, torch.Tensor):
        assert loaded.dtype == saved.dtype, where
        assert loaded.stride() == saved.stride(), where
        assert loaded.requires_grad == saved.requires_grad, where
        assert torch.equal(loaded, saved), where
    elif isinstance(saved, np.ndarray):
        assert loaded.dtype == saved.dtype, where
        np.testing.assert_array_equal(loaded, saved)
    elif isinstance(saved, HistoryBuffer):
        for mine, theirs in zip(loaded.data, saved.data):
            assert_same(mine, theirs, where)
        assert loaded.max_length == saved.max_length
    elif isinstance(saved, dict):
        assert list(loaded) == list(saved), where
        for key in saved:
            assert_same(loaded[key], saved[key], f'{where}[{key!r}]')
        assert getattr(loaded, '_metadata', None) == getattr(
            saved, '_metadata', None), where
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved), where
        for i, (mine, theirs) in enumerate(zip(loaded, saved)):
            assert_same(mine, theirs, f'{where}[{i}]')
    else:
        assert loaded == saved, where


@pytest.mark.parametrize('legacy', [False, True])
def test_mmengine_checkpoint_loads_exactly(tmp_path, legacy):
    path = str(tmp_path / 'iter_3.pth')
    saved = write_mmengine_checkpoint(path)
    if legacy:  # torch's format before 1.6
        torch.save(saved, path, _use_new_zipfile_serialization=False)
    loaded = read_checkpoint(path)
    assert_same(loaded, saved)
    assert type(loaded['message_hub']['runtime_info']['eta']) is np.float64
    hub = MessageHub('resumed')
    hub.load_state_dict(loaded['message_hub'])
    assert hub.get_scalar('train/loss').mean() == pytest.approx(
        (1 + 1 / 2 + 1 / 3) / 3)
    assert hub.get_scalar('train/loss').statistics('min') == pytest.approx(
        1 / 3)


def test_tensors_keep_their_layout_and_sharing(tmp_path):
    base = torch.arange(24.).reshape(4, 6)
    saved = {'base': base, 'view': base[1:, ::2], 't': base.t(),
             'param': torch.nn.Parameter(torch.randn(3)),
             'half': torch.randn(5).half(), 'bf16': torch.randn(2).bfloat16(),
             'uint16': torch.arange(4).to(torch.uint16),
             'size': torch.Size([2, 3]), 'device': torch.device('cpu'),
             'set': {1, 2}, 'bytes': b'\x00\xff', 'empty': b''}
    path = str(tmp_path / 'tensors.pth')
    torch.save(saved, path)
    loaded = read_checkpoint(path)
    assert_same(loaded, saved)
    assert loaded['view'].data_ptr() == loaded['base'][1, 0].data_ptr()
    assert read_checkpoint(path, map_location='meta')['base'].is_meta


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match='model.backbone.init_cfg.checkpoint'):
        load_file(str(tmp_path / 'absent.pth'))


def test_errors_name_the_file(tmp_path):
    path = str(tmp_path / 'evil.pth')
    _os_system(path, str(tmp_path / 'marker'))
    with pytest.raises(CheckpointError, match=re.escape(path)):
        load_file(path)
    assert not (tmp_path / 'marker').exists()
