"""Open every file of a checkpoint corpus through one loading route, in a
fresh process; report per file what happened, and any marker file or
process state that changed.

    python tests/checkpoint_probe.py ROUTE CORPUS_DIR [ADE_ROOT]

ROUTE 'unsafe' is the control: each attack through the loader it targets.

CORPUS_DIR/manifest.json lists the files (see test_checkpoint_safety.py);
the report is one JSON object on the last line of stdout.
"""
import builtins
import copyreg
import io
import json
import os
import os.path as osp
import pickle
import sys
import traceback
import zipfile

import numpy as np
import torch
import torch._utils
import torch.serialization

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEG_CONFIG = 'configs/quickstart/hvit3-t_upernet_shapes.py'


def _ids(namespace) -> dict:
    # the warnings module's own bookkeeping is not the file's doing
    return {k: id(v) for k, v in vars(namespace).items()
            if k != '__warningregistry__'}


def process_state() -> dict:
    """What a crafted file could change in this process."""
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import CheckpointLoader
    f8 = np.dtype('f8')
    return {
        'grad enabled': torch.is_grad_enabled(),
        'inference mode': torch.is_inference_mode_enabled(),
        'default dtype': str(torch.get_default_dtype()),
        'deterministic': torch.are_deterministic_algorithms_enabled(),
        'anomaly mode': torch.is_anomaly_enabled(),
        # as a set: a scoped safe_globals (timm's) restores it reordered
        'torch safe globals':
        sorted(map(repr, torch.serialization.get_safe_globals())),
        'HistoryBuffer statistics':
        {k: id(v)
         for k, v in HistoryBuffer._statistics_methods.items()},
        'HistoryBuffer': _ids(HistoryBuffer),
        'torch.no_grad': _ids(torch.no_grad),
        'torch.enable_grad': _ids(torch.enable_grad),
        'torch.Tensor': _ids(torch.Tensor),
        'torch._utils': _ids(torch._utils),
        'torch.serialization': _ids(torch.serialization),
        'builtins': _ids(builtins),
        'numpy float64': (f8.byteorder, f8.itemsize, f8.str, f8.fields),
        'copyreg': (len(copyreg.dispatch_table),
                    dict(copyreg._extension_registry)),
        'mmengine loaders': {k: id(v)
                             for k, v in CheckpointLoader._schemes.items()},
        'environment': dict(os.environ),
        'working dir': os.getcwd(),
        'yacs imported': 'yacs' in sys.modules,
    }


def diff(before: dict, after: dict) -> list:
    return [key for key in before if before[key] != after[key]]


def route_load_file():
    from mmvit3.checkpoint import load_file
    return load_file


def route_backbone():
    from mmdet.registry import MODELS
    model = MODELS.build(dict(type='HViT3', arch='tiny',
                              init_cfg=dict(type='Pretrained')))

    def load(path):
        model.init_cfg['checkpoint'] = path
        model.init_weights()

    return load


def route_timm():
    import timm

    def load(path):
        return timm.create_model(
            'hvit3_tiny', pretrained=True,
            pretrained_cfg_overlay=dict(file=path))

    return load


def route_torch_load():
    return torch.load


def route_mmengine():
    from mmengine.runner import load_checkpoint
    model = torch.nn.Linear(2, 2)
    return lambda path: load_checkpoint(model, path, map_location='cpu')


def route_tools(ade_root: str, first: str):
    """tools/test.py end to end on the first file, then the runner's own
    loads (``load_from``: load_checkpoint; ``--resume``: resume) for all."""
    from mmvit3 import cli
    options = []
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options += [f'{loader}.dataset.data_root={ade_root}',
                    f'{loader}.num_workers=0',
                    f'{loader}.persistent_workers=False']
    work_dir = osp.join(osp.dirname(first), 'work_dir')
    argv = [SEG_CONFIG, first, '--work-dir', work_dir, '--cfg-options',
            *options]
    try:
        cli.test(argv)
        tool = 'loaded'
    except Exception as error:  # reported, checked by the test
        tool = f'{type(error).__name__}: {error}'
    runner = cli.build_runner(cli.load_config(cli.parse_test_args(argv)))

    def load(path):
        errors = []
        for step in (runner.load_checkpoint, runner.resume):
            try:
                step(path)
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    return load, tool


def unsafe_loader(kind: str):
    """The loader an attack of the corpus targets (the control run)."""
    if kind == 'pickle':
        return lambda path: pickle.load(open(path, 'rb'))
    if kind == 'torch_unsafe':
        return lambda path: torch.load(path, weights_only=False)
    if kind == 'prefix_check':
        return load_with_prefix_check
    from mmengine.logging import HistoryBuffer
    core = sys.modules[np.empty(0).__reduce__()[0].__module__]
    # what mmvit3 once added to torch's allowlist at import
    allowed = [HistoryBuffer, getattr, np.dtype, np.ndarray,
               core._reconstruct, core.scalar] + [
                   type(np.dtype(t))
                   for t in ('float64', 'float32', 'int64', 'int32', 'bool')]

    def load(path):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path)

    return load


def load_with_prefix_check(path):
    """The former reader's check: any torch._utils name that starts with
    _rebuild_, resolved by the standard library."""

    class Unpickler(pickle.Unpickler):

        def find_class(self, module, name):
            if module == 'torch._utils' and name.startswith('_rebuild_'):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f'{module}.{name}')

    with zipfile.ZipFile(path) as archive:
        return Unpickler(io.BytesIO(archive.read('archive/data.pkl'))).load()


def main():
    route, corpus = sys.argv[1], sys.argv[2]
    if route != 'unsafe':
        import mmvit3  # noqa: F401  (the process has imported mmvit3)
    os.chdir(REPO)
    with open(osp.join(corpus, 'manifest.json')) as f:
        manifest = json.load(f)
    markers = osp.join(corpus, 'markers')
    report = {'files': {}}
    entries = [e for e in manifest['entries'] if route not in e['skip']]
    if route == 'unsafe':
        entries = [e for e in entries if e['control']]
    elif route == 'tools':
        load, report['tool'] = route_tools(sys.argv[3],
                                           entries[0]['file'])
    else:
        load = globals()[f'route_{route}']()
    if route != 'unsafe':
        try:  # a genuine file first: lazy imports and registrations now
            load(manifest['warmup'])
        except Exception:
            pass
    for entry in entries:
        if route == 'unsafe':
            load = unsafe_loader(entry['control'])
        before = process_state()
        try:
            load(entry['file'])
            outcome = 'loaded'
        except Exception as error:
            outcome = f'{type(error).__name__}: {error}'
            if isinstance(error, (NameError, AttributeError)):
                outcome += traceback.format_exc()[-2000:]
        report['files'][entry['name']] = {
            'outcome': outcome,
            'changed': diff(before, process_state()),
            'markers': sorted(os.listdir(markers)),
        }
    print(json.dumps(report))


if __name__ == '__main__':
    main()
