"""H-ViT3-T's convolutions in half precision on a CPU: aten's gradient
kernels against ``mmvit3.ops.conv.conv_backward``, which computes the slow
ones in float32 (``slow_half_grads``), timed in one process.

    python benchmarks/half_conv_grads.py [--size 512] [--batch 2]
        [--repeats 3] [--threads N]

For each convolution (its shape in a ``--batch`` x ``--size``² training
step) and dtype it prints the forward and each gradient's milliseconds
(medians of interleaved runs), on aten's kernels and through
``conv_backward``, and each time as a multiple of float32's on aten. Some
fp16 gradients take seconds each on aten's kernels (a minute for
``--repeats 3``).
"""
import argparse
import os.path as osp
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))),
                            'tools'))
import benchmark  # noqa: E402
from mmvit3.models.hvit3 import ARCH_SETTINGS  # noqa: E402
from mmvit3.ops.conv import conv_backward  # noqa: E402

DTYPES = {'float32': torch.float32, 'bf16': torch.bfloat16,
          'fp16': torch.float16}


def convolutions(size: int):
    """(name, in channels, out channels, input side, kernel, stride,
    groups) of H-ViT3-T's convolution kinds for a ``size``² image."""
    dims = ARCH_SETTINGS['tiny']['dims']
    stem = dims[0] // 2
    return [
        ('stem 3x3', stem, stem, size // 2, 3, 1, 1),
        ('stem 3x3 stride 2', stem, 4 * dims[0], size // 2, 3, 2, 1),
        ('downsampling 1x1 expand', dims[0], 4 * dims[1], size // 4, 1, 1,
         1),
        ('downsampling depthwise stride 2', 4 * dims[1], 4 * dims[1],
         size // 4, 3, 2, 4 * dims[1]),
        ('downsampling 1x1 project', 4 * dims[1], dims[1], size // 8, 1, 1,
         1),
        ('CPE depthwise', dims[0], dims[0], size // 4, 3, 1, dims[0]),
        ('MLP depthwise', 4 * dims[0], 4 * dims[0], size // 4, 3, 1,
         4 * dims[0]),
    ]


def time_convolution(spec, batch: int, dtype: torch.dtype, repeats: int):
    """{column: ms} for one convolution in ``dtype``: medians of
    interleaved runs, after a warm-up run each."""
    _, in_channels, out_channels, side, kernel, stride, groups = spec
    x = torch.randn(batch, in_channels, side, side).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = (torch.randn(out_channels, in_channels // groups, kernel,
                          kernel) * .1).to(dtype)
    geometry = [stride] * 2, [kernel // 2] * 2
    grad_out = torch.randn_like(F.conv2d(x, weight, None, *geometry, 1,
                                         groups))

    def aten(mask):
        return lambda: torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, *geometry, [1, 1], False, [0, 0],
            groups, mask)

    def ours(mask):
        return lambda: conv_backward(grad_out, x, weight, *geometry, groups,
                                     mask)

    input_only, weight_only = [True, False, False], [False, True, False]
    runs = {
        'forward': lambda: F.conv2d(x, weight, None, *geometry, 1, groups),
        'input grad, aten': aten(input_only),
        'weight grad, aten': aten(weight_only),
        'input grad, mmvit3': ours(input_only),
        'weight grad, mmvit3': ours(weight_only),
    }
    return {
        column: statistics.median(samples)
        for column, samples in benchmark.run_times(runs, 'cpu',
                                                   repeats).items()
    }


def table_lines(size: int, batch: int, repeats: int):
    """The table's lines, each row as soon as it is timed."""
    columns = ['forward', 'input grad, aten', 'weight grad, aten',
               'input grad, mmvit3', 'weight grad, mmvit3']
    yield (f'{batch} x {size}², {torch.get_num_threads()} threads, ms, '
           f'medians of {repeats}; in brackets, x float32 on aten')
    yield ''
    yield '| convolution | dtype | ' + ' | '.join(columns) + ' |'
    yield '| --- | --- | ' + ' | '.join('---' for _ in columns) + ' |'
    for spec in convolutions(size):
        float32 = None
        for name, dtype in DTYPES.items():
            times = time_convolution(spec, batch, dtype, repeats)
            float32 = float32 or times
            cells = []
            for column in columns:
                ms = times[column]
                baseline = float32[column.replace('mmvit3', 'aten')]
                cells.append(f'{ms:.1f} ({ms / baseline:.2f})')
            yield f'| {spec[0]} | {name} | ' + ' | '.join(cells) + ' |'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', type=int, default=512,
                        help='image side (default 512)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int,
                        help='torch threads (default: torch\'s)')
    args = parser.parse_args(argv)
    if args.size < 32 or args.size % 32:
        parser.error(f'--size must be a multiple of 32, got {args.size}')
    if args.threads:
        torch.set_num_threads(args.threads)
    for line in table_lines(args.size, args.batch, args.repeats):
        print(line, flush=True)


if __name__ == '__main__':
    main()
