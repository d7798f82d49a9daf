"""Where the training step's time goes: each part of H-ViT3-T and Swin-T
replaced in turn by a near-free stand-in, timed interleaved with the whole
backbones; a part's share is the whole step's time less the step without it.

    python benchmarks/train_step_parts.py [--size 512x512] [--batch 2]
        [--repeats 5] [--threads N] [--amp {bf16,fp16}]
        [--setting module.NAME=VALUE ...]

With ``--setting`` it times H-ViT3-T's whole step under each module-level
setting instead (a chunk or band size, say), interleaved with the step as
it is and Swin-T's: what a setting saves alone, in a micro-benchmark of one
layer, can vanish in the step, where the neighbours' memory traffic and the
allocator's state differ.

Profilers attribute time per operator, and on a CPU whose memory traffic
sets the speed they charge an operator for the cache misses and page faults
its neighbours caused; removing a part measures what the step would save.
The stand-ins keep shapes and the gradient path: token mixer and MLP return
their input (times one), the stem is a 4x4 stride-4 convolution (Swin-T's
patch embedding), downsampling a 2x2 stride-2 convolution.
"""
import argparse
import ast
import importlib
import os.path as osp
import statistics
import sys
from contextlib import ExitStack
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'tools'))
import benchmark  # noqa: E402

from mmvit3.models import hvit3  # noqa: E402


def patched_convolution(out_channels: int, stride: int):
    """A stand-in ``forward(x)`` for the stem or a downsampling layer: a
    ``stride`` x ``stride`` convolution with one weight per input width."""
    weights = {}

    def forward(self, x):
        channels = x.shape[1]
        if channels not in weights:  # made once: the stand-in is timed
            weights[channels] = nn.Parameter(
                torch.randn(out_channels(channels), channels, stride, stride)
                * .02)
        return F.conv2d(x.contiguous(memory_format=torch.channels_last),
                        weights[channels], stride=stride)

    return forward


def parts():
    """{model: {part: [(object, attribute, stand-in), ...]}}."""
    from mmcv.cnn.bricks.transformer import FFN
    from mmdet.models.backbones.swin import ShiftWindowMSA
    dims = hvit3.ARCH_SETTINGS['tiny']['dims']
    next_dims = dict(zip(dims, dims[1:]))
    return {
        'hvit3-t': {
            'TTT inner step': [(hvit3, 'ttt_inner_step',
                                lambda qkv, w1, w2, w3, heads, height, width,
                                scale, impl: qkv[..., :(w1.shape[1] + 1) *
                                                 w1.shape[2]] * 1.)],
            'token mixer': [(hvit3.TTT, 'forward',
                             lambda self, x, height, width: x * 1.)],
            'MLP': [(hvit3.Mlp, 'forward',
                     lambda self, x, height, width: x * 1.)],
            'stem': [(hvit3.Stem, 'forward',
                      patched_convolution(lambda _: dims[0], 4))],
            'downsampling': [(hvit3.Downsample, 'forward',
                              patched_convolution(next_dims.get, 2))],
        },
        'swin-t': {
            'token mixer': [(ShiftWindowMSA, 'forward',
                             lambda self, query, hw_shape: query * 1.)],
            'MLP': [(FFN, 'forward',
                     lambda self, x, identity=None: identity + x * 1.)],
        },
    }


def setting(text: str):
    """``'package.module.NAME=VALUE'`` -> a patch (module, NAME, VALUE);
    VALUE is a Python literal."""
    target, equals, value = text.partition('=')
    module_name, _, name = target.rpartition('.')
    if not equals or not module_name:
        raise argparse.ArgumentTypeError(
            f'expected module.NAME=VALUE, got {text!r}')
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not hasattr(module, name):
        raise argparse.ArgumentTypeError(f'{module_name} has no {name!r}')
    try:
        return module, name, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            f'{value!r} is not a Python literal') from None


def patched(step, patches):
    """``step`` with the ``(object, attribute, value)`` patches applied."""

    def run():
        with ExitStack() as stack:
            for owner, name, stand_in in patches:
                stack.enter_context(mock.patch.object(owner, name, stand_in))
            step()

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', default='512x512', help='HxW')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int)
    parser.add_argument(
        '--amp', choices=sorted(benchmark.AMP_DTYPES),
        help='forward under torch.autocast in this dtype (default: float32)')
    parser.add_argument(
        '--setting', action='append', default=[], type=setting,
        metavar='MODULE.NAME=VALUE',
        help='time H-ViT3-T with this module attribute set (repeatable), '
        'instead of the parts')
    args = parser.parse_args()
    settings = {f'{module.__name__}.{name}={value!r}': (module, name, value)
                for module, name, value in args.setting}
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark.CpuPeakMemory().exact(False)
    model_parts = parts()
    backbones = benchmark.build_backbones(list(model_parts))
    image = torch.randn(args.batch, 3, *benchmark.parse_size(args.size))
    steps = {}
    for name, model in backbones.items():
        step = benchmark.make_step(model, 'train', image, args.amp)
        steps[name] = step
        if settings:
            continue
        for part, patches in model_parts[name].items():
            steps[f'{name} without {part}'] = patched(step, patches)
    for text, patch in settings.items():
        steps[f'hvit3-t with {text}'] = patched(steps['hvit3-t'], [patch])
    times = {
        name: statistics.median(samples)
        for name, samples in benchmark.run_times(steps, 'cpu',
                                                 args.repeats).items()
    }
    print(f'training step, batch {args.batch}, {args.size}, '
          f"{args.amp or 'float32'}, {torch.get_num_threads()} threads, "
          f'medians of {args.repeats}')
    if settings:
        print_settings(times, list(settings))
    else:
        print_parts(times, model_parts)


def print_settings(times, settings):
    print('\n| H-ViT3-T | ms | x as it is | x Swin-T |\n| --- | --- | --- '
          '| --- |')
    rows = [('as it is', 'hvit3-t')] + [
        (text, f'hvit3-t with {text}') for text in settings]
    for label, name in rows:
        print(f'| {label} | {times[name]:.0f} | '
              f'{times[name] / times["hvit3-t"]:.3f} | '
              f'{times[name] / times["swin-t"]:.3f} |')
    print(f'| Swin-T | {times["swin-t"]:.0f} | | |')


def print_parts(times, model_parts):
    print('\n| model | part | ms | share of the step |\n| --- | --- | --- '
          '| --- |')
    for name in model_parts:
        whole = times[name]
        print(f'| {name} | whole step | {whole:.0f} | 100 % |')
        for part in model_parts[name]:
            saved = whole - times[f'{name} without {part}']
            print(f'| {name} | {part} | {saved:.0f} | '
                  f'{100 * saved / whole:.0f} % |')


if __name__ == '__main__':
    main()
