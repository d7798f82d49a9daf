"""Helpers for mmvit3's tests.

Real weights and datasets cannot be downloaded in CI, so tests write
checkpoints in the published layouts (:func:`write_published_checkpoint`)
and tiny datasets in the COCO and ADE20K layouts (:mod:`mmvit3.shapes`),
then shrink the published configs onto them (:func:`det_options`,
:func:`seg_options`) and run the tools as a user would (:func:`run_tool`).
"""
import importlib.util
import json
import math
import os
import os.path as osp
import re
import subprocess
import sys
import tempfile
import types
from typing import Callable, Dict, List, Optional

import pytest
import torch

from .models.hvit3 import HViT3

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
# CUDA tests are reported as skipped, not passed, where no GPU is visible.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason='needs a GPU')
DEVICES = ['cpu', pytest.param('cuda', marks=requires_cuda)]
QUICKSTART_DET = 'configs/quickstart/mask-rcnn_hvit3-t_fpn_shapes.py'
QUICKSTART_SEG = 'configs/quickstart/hvit3-t_upernet_shapes.py'


def relative_error(got: torch.Tensor, expected: torch.Tensor,
                   ord: float = math.inf) -> float:
    """``||got - expected|| / ||expected||`` in the vector norm ``ord``: by
    default the largest difference relative to the largest magnitude."""
    got, expected = got.double(), expected.double()
    return (torch.linalg.vector_norm(got - expected, ord) /
            torch.linalg.vector_norm(expected, ord)).item()


# directional_grad_error of a correct float64 backward is about 1e-9
GRADCHECK_TOLERANCE = 1e-6


def directional_grad_error(fn: Callable, inputs, eps: float = 1e-6,
                           directions: int = 3, seed: int = 0) -> float:
    """Backward against forward, input by input: for random output weights
    g and a random step v of one input x_i, <g, (f(x_i + eps v) -
    f(x_i - eps v)) / 2 eps> against <backward(g)_i, v>; the largest
    relative difference over the inputs and directions.

    Float64 inputs give about 1e-9 for a correct backward. Unlike
    ``torch.autograd.gradcheck``, a failure costs no full Jacobian (which
    takes minutes for a Triton kernel under the interpreter).
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    worst = 0.
    for _ in range(directions):
        weights = torch.randn(out.shape, generator=generator,
                              dtype=out.dtype)
        grads = torch.autograd.grad(out, inputs, weights, retain_graph=True)
        for i, (x, grad) in enumerate(zip(inputs, grads)):
            step = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            with torch.no_grad():
                plus, minus = (fn(*inputs[:i], x + sign * eps * step,
                                  *inputs[i + 1:]) for sign in (1, -1))
            numeric = ((plus - minus) * weights).sum() / (2 * eps)
            analytic = (grad * step).sum()
            worst = max(worst, (abs(analytic - numeric) /
                                abs(analytic).clamp_min(1e-12)).item())
    return worst


def saved_bytes(fn: Callable, *args) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn(*args)``
    runs (each storage once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def backbone_outputs_and_grads(model, image) -> List[torch.Tensor]:
    """A backbone's outputs, then its parameters' gradients of a fixed
    weighted sum of them."""
    model.zero_grad(set_to_none=True)
    outs = model(image)
    sum((out * torch.linspace(
        -1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
         ).sum() for out in outs).backward()
    return [o.detach() for o in outs] + [
        p.grad.clone() for p in model.parameters() if p.grad is not None
    ]


def published_state_dict(arch='tiny',
                         seed: Optional[int] = None
                         ) -> Dict[str, torch.Tensor]:
    """The authors' classification key layout for ``arch``, with their
    fixed-size RoPE tables.

    With ``seed``, every tensor is freshly randomised, so that a test can
    tell loaded weights from initial ones.
    """
    model = HViT3(arch)
    generator = (torch.Generator().manual_seed(seed)
                 if seed is not None else None)
    state_dict = {}
    for key, value in model.state_dict().items():
        if generator is not None and value.is_floating_point():
            value = torch.randn(value.shape, generator=generator) * 0.05 + (
                1.0 if key.endswith('running_var') else 0.0)
            value = value.abs() if key.endswith('running_var') else value
        state_dict[key] = value.clone()
    for i, depth in enumerate(model.depths):
        for j in range(depth):
            state_dict[f'layers.{i}.blocks.{j}.rope.rotations'] = torch.randn(
                56 // 2**i, 56 // 2**i, model.dims[i] // 2, 2)
    return state_dict


class _CfgNode(dict):
    """Pickled under the name ``yacs.config.CfgNode``, like the authors'."""


def write_published_checkpoint(path: str,
                               arch='tiny',
                               seed: int = 0,
                               with_ema: bool = True,
                               with_training_state: bool = True) -> dict:
    """Write an ImageNet checkpoint as the authors' training script does:
    ``model``, ``state_dict_ema`` and the training state, whose ``config``
    is a yacs ``CfgNode`` (a module absent when the file is read back).

    Returns the dict of state dicts written (``model`` and maybe
    ``state_dict_ema``).
    """
    checkpoint = {'model': published_state_dict(arch, seed)}
    if with_ema:
        checkpoint['state_dict_ema'] = published_state_dict(arch, seed + 1)
    states = dict(checkpoint)
    if with_training_state:
        config = _CfgNode(MODEL=_CfgNode(TYPE='hvit3', NAME=f'hvit3_{arch}'))
        checkpoint.update(
            optimizer={'state': {}, 'param_groups': []},
            lr_scheduler={'last_epoch': 300},
            epoch=299,
            max_accuracy=84.0,
            config=config)
    yacs = types.ModuleType('yacs')
    yacs_config = types.ModuleType('yacs.config')
    yacs.config = yacs_config
    yacs_config.CfgNode = _CfgNode
    saved_name = (_CfgNode.__module__, _CfgNode.__qualname__)
    _CfgNode.__module__, _CfgNode.__qualname__ = 'yacs.config', 'CfgNode'
    previous = {
        name: sys.modules.get(name)
        for name in ('yacs', 'yacs.config')
    }
    sys.modules.update({'yacs': yacs, 'yacs.config': yacs_config})
    try:
        torch.save(checkpoint, path)
    finally:
        _CfgNode.__module__, _CfgNode.__qualname__ = saved_name
        for name, module in previous.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return states


def load_tool(name: str, folder: str = 'tools'):
    """``FOLDER/NAME.py`` as a module (tools/ and benchmarks/ are not
    packages)."""
    spec = importlib.util.spec_from_file_location(
        name, osp.join(REPO, folder, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(*args, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    """Run ``python tools/...`` as a user would; output captured as text."""
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    return subprocess.run([sys.executable, *args],
                          cwd=cwd,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=timeout)


def _tuple(names) -> str:
    return '(' + ','.join(names) + ')'


def _loader_options(root: str, loaders) -> List[str]:
    """Each loader reads ``root`` in the main process (quick to start)."""
    options = []
    for loader in loaders:
        options += [
            f'{loader}.dataset.data_root={root}',
            f'{loader}.num_workers=0',
            f'{loader}.persistent_workers=False',
        ]
    return options


def det_options(coco_root: str, checkpoint: str,
                eval_loader: str) -> List[str]:
    """Shrink a Mask R-CNN ms-crop config onto the shapes data (CPU, fp32)."""
    from .shapes import SHAPES
    classes = _tuple(SHAPES)
    evaluator = eval_loader.replace('dataloader', 'evaluator')
    small = '[(128,96)]'
    loaders = ('train_dataloader', eval_loader)
    return _loader_options(f'{coco_root}/', loaders) + [
        f'model.backbone.init_cfg.checkpoint={checkpoint}',
        'model.roi_head.bbox_head.num_classes=4',
        'model.roi_head.mask_head.num_classes=4',
        'optim_wrapper.type=OptimWrapper',
        f'train_dataloader.dataset.metainfo.classes={classes}',
        'train_dataloader.dataset.ann_file=annotations/instances_train.json',
        'train_dataloader.dataset.data_prefix.img=train/',
        'train_dataloader.batch_size=2',
        f'train_dataloader.dataset.pipeline.3.transforms.0.0.scales={small}',
        f'train_dataloader.dataset.pipeline.3.transforms.1.0.scales={small}',
        'train_dataloader.dataset.pipeline.3.transforms.1.1.crop_size=(64,64)',
        f'train_dataloader.dataset.pipeline.3.transforms.1.2.scales={small}',
        f'{eval_loader}.dataset.metainfo.classes={classes}',
        f'{eval_loader}.dataset.ann_file=annotations/instances_val.json',
        f'{eval_loader}.dataset.data_prefix.img=val/',
        f'{eval_loader}.dataset.pipeline.1.scale=(128,96)',
        f'{evaluator}.ann_file={coco_root}/annotations/instances_val.json',
        'train_cfg.max_epochs=1',
        'default_hooks.logger.interval=1',
    ]


def seg_options(ade_root: str, checkpoint: str,
                eval_loader: str) -> List[str]:
    """Shrink an UperNet ADE20K config onto the shapes data (CPU, fp32)."""
    from .shapes import SEG_CLASSES
    classes = _tuple(SEG_CLASSES)
    loaders = ('train_dataloader', eval_loader)
    options = _loader_options(ade_root, loaders) + [
        f'model.backbone.init_cfg.checkpoint={checkpoint}',
        f'model.decode_head.num_classes={len(SEG_CLASSES)}',
        f'model.auxiliary_head.num_classes={len(SEG_CLASSES)}',
        'model.data_preprocessor.size=(64,64)',
        'optim_wrapper.type=OptimWrapper',
        'train_dataloader.batch_size=2',
        'train_dataloader.dataset.pipeline.2.scale=(128,64)',
        'train_dataloader.dataset.pipeline.3.crop_size=(64,64)',
        f'{eval_loader}.dataset.pipeline.1.scale=(128,64)',
        'train_cfg.max_iters=1',
        'train_cfg.val_interval=1',
        'default_hooks.checkpoint.interval=1',
        'default_hooks.logger.interval=1',
    ]
    # the shapes classes are not ADE's 150, so the generic dataset class
    for loader in loaders:
        options += [
            f'{loader}.dataset.type=BaseSegDataset',
            f'{loader}.dataset.reduce_zero_label=True',
            f'{loader}.dataset.metainfo.classes={classes}',
        ]
    return options


def quickstart_det_options(coco_root: str) -> List[str]:
    """Point the quick-start detector at tiny test data (2 images)."""
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    return _loader_options(f'{coco_root}/', loaders) + [
        'train_dataloader.batch_size=2',
        f'val_evaluator.ann_file={coco_root}/annotations/instances_val.json',
        f'test_evaluator.ann_file={coco_root}/annotations/instances_val.json',
        'default_hooks.logger.interval=1',
    ]


def quickstart_seg_options(ade_root: str, max_iters: int) -> List[str]:
    """Point the quick-start segmentor at tiny test data."""
    loaders = ('train_dataloader', 'val_dataloader', 'test_dataloader')
    return _loader_options(ade_root, loaders) + [
        'train_dataloader.batch_size=2',
        f'train_cfg.max_iters={max_iters}',
        f'train_cfg.val_interval={max_iters}',
        'default_hooks.logger.interval=1',
    ]


def run_interpreted(test_file: str, results_path: str) -> dict:
    """Run ``test_file`` as a script in a child process with the Triton
    interpreter on (``TRITON_INTERPRET=1``, no GPU visible) and return the
    JSON it writes to ``results_path``.

    The interpreter must be on before any kernel is defined, while other
    test modules import mmvit3 (and with it the compiled kernels) first: so
    the interpreted checks run in a fresh process, and the test process
    never turns the interpreter on.
    """
    env = dict(os.environ, TRITON_INTERPRET='1', CUDA_VISIBLE_DEVICES='',
               PYTHONPATH=os.pathsep.join(
                   [REPO, os.environ.get('PYTHONPATH', '')]))
    child = subprocess.run([sys.executable, test_file, results_path],
                           cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-6000:]
    with open(results_path) as results:
        return json.load(results)


class _LaunchRecorder:
    """Stands in for a Triton kernel: records its launches instead of
    running them."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(
            (self.kernel, args, kwargs))


def record_launches(monkeypatch, module) -> list:
    """Replace every ``*_kernel`` of ``module`` by a recorder; return the
    list that the launches (kernel, args, kwargs) are appended to."""
    launches = []
    for name in dir(module):
        if name.endswith('_kernel'):
            monkeypatch.setattr(
                module, name, _LaunchRecorder(getattr(module, name),
                                              launches))
    return launches


def _ptxas_spills(kernel) -> int:
    """Bytes of register spill stores ptxas reports for a compiled
    kernel."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as folder:
        ptx = osp.join(folder, 'kernel.ptx')
        with open(ptx, 'w') as source:
            source.write(kernel.asm['ptx'])
        report = subprocess.run(
            [get_ptxas(90).path, '-v', '--gpu-name=sm_90a', ptx, '-o',
             osp.join(folder, 'kernel.o')],
            capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r'(\d+) bytes spill stores',
                                          report))


def compile_for_h100(launches: list) -> Dict[str, int]:
    """Compile each distinct recorded launch to an sm_90 binary (H100,
    H200) with Triton's own compiler and ptxas, specialised on its
    arguments as Triton's launcher would: no GPU needed. Returns
    {kernel name: bytes of register spills, the most over its launches}."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget('cuda', 90, 32)
    backend = make_backend(target)
    seen, spills = set(), {}
    for kernel, args, kwargs in launches:
        binder = create_function_from_signature(kernel.signature,
                                                kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        name = kernel.fn.__name__
        key = (name, str(specialization), str(options))
        if key in seen:
            continue
        seen.add(key)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options)
        compiled = triton_compile(
            ASTSource(kernel, signature, constexprs, attrs), target=target,
            options=options.__dict__)
        spills[name] = max(spills.get(name, 0), _ptxas_spills(compiled))
    return spills
