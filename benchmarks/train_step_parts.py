"""Where the training step's time goes: each part of H-ViT3-T and Swin-T
replaced in turn by a near-free stand-in, timed interleaved with the whole
backbones; a part's share is the whole step's time less the step without it.

    python benchmarks/train_step_parts.py [--size 512x512] [--batch 2]
        [--repeats 5] [--threads N]

Profilers attribute time per operator, and on a CPU whose memory traffic
sets the speed they charge an operator for the cache misses and page faults
its neighbours caused; removing a part measures what the step would save.
The stand-ins keep shapes and the gradient path: token mixer and MLP return
their input (times one), the stem is a 4x4 stride-4 convolution (Swin-T's
patch embedding), downsampling a 2x2 stride-2 convolution.
"""
import argparse
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
            'TTT inner step': [(hvit3, 'fast_ttt',
                                lambda qkv, w1, w2, w3, heads, height, width,
                                scale: qkv[..., :(w1.shape[1] + 1) *
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


def without(step, patches):
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    benchmark.CpuPeakMemory().exact(False)
    model_parts = parts()
    backbones = benchmark.build_backbones(list(model_parts))
    image = torch.randn(args.batch, 3, *benchmark.parse_size(args.size))
    steps = {}
    for name, model in backbones.items():
        step = benchmark.make_step(model, 'train', image)
        steps[name] = step
        for part, patches in model_parts[name].items():
            steps[f'{name} without {part}'] = without(step, patches)
    times = {
        name: statistics.median(samples)
        for name, samples in benchmark.run_times(steps, 'cpu',
                                                 args.repeats).items()
    }
    print(f'training step, batch {args.batch}, {args.size}, '
          f'{torch.get_num_threads()} threads, medians of {args.repeats}')
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
