"""Micro-benchmark of the TTT inner step alone on a GPU: the fused Triton
kernels against the torch implementations, forward + backward.

    python benchmarks/ttt_kernels.py [--sizes 800x1216 2048x2048]
        [--batch 2] [--dtype {bf16,fp16,fp32}] [--repeats 20]
        [--peak-gbs GBPS]

For each input image size (height x width), the four stage maps of
H-ViT3-T (H/4 .. H/32, sides rounded up as the stem and the downsampling
layers pad them; widths 64, 128, 320, 512 with 2, 4, 10, 16 heads) run the
inner step (``mmvit3.ops.ttt``) on random ``qkv`` of the stage's size in
``--dtype`` (the inner weights float32, as AMP keeps them), then backward of
a random output gradient: ``fused_ttt``, ``chunked_ttt`` and ``naive_ttt``,
interleaved round after round in one process (the order reversed every other
round), after a warm-up run each (Triton compiles there). Times are CUDA
events around one forward + backward; medians are reported.

Bytes: what the fused kernels must move at the least, each pass reading its
slice of ``qkv`` and writing its outputs once (the partial sums and the
inner state are a few KiB per image and head): forward reads k and v, then
q, and writes the output; backward reads q and the output's gradient and
writes dq, then reads k and v and writes dk and dv. With C + d channels per
q, k, v and output: 11 (C + d) elements per token. Bandwidth: those bytes
over the median time, against the device's peak DRAM bandwidth, taken as
2 x memory clock x bus width as CUDA reports them (double data rate), or
``--peak-gbs``.
"""
import argparse
import statistics
import sys
from typing import Callable, Dict, List, Tuple

import torch

from mmvit3.ops.ttt import chunked_ttt, fused, naive_ttt

DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16,
          'fp32': torch.float32}
# H-ViT3-T: (channels, heads) per stage, strides 4, 8, 16, 32
STAGES = ((64, 2), (128, 4), (320, 10), (512, 16))
HEAD_DIM = 32
SCALE = 1 / 3


def parse_size(text: str) -> Tuple[int, int]:
    height, _, width = text.partition('x')
    return int(height), int(width or height)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', nargs='+', type=parse_size,
                        default=[(800, 1216), (2048, 2048)],
                        help='input images, HEIGHTxWIDTH')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--dtype', choices=DTYPES, default='bf16',
                        help='dtype of qkv (as under autocast)')
    parser.add_argument('--repeats', type=int, default=20)
    parser.add_argument('--peak-gbs', type=float, default=None,
                        help='peak DRAM bandwidth in GB/s (default: from '
                        'the device properties)')
    return parser.parse_args()


def stage_maps(height: int, width: int) -> List[Tuple[int, int]]:
    """Map sizes at strides 4..32: the stem pads to a multiple of 4, each
    downsampling pads odd sides by one."""
    maps = [(-(-height // 4), -(-width // 4))]
    for _ in range(3):
        maps.append(tuple(-(-side // 2) for side in maps[-1]))
    return maps


def make_step(fn: Callable, batch: int, channels: int, heads: int,
              height: int, width: int, dtype: torch.dtype) -> Callable:
    """Forward + backward of ``fn`` on random inputs of one stage."""
    tokens, total = height * width, 3 * (channels + HEAD_DIM)
    qkv = torch.randn(batch, tokens, total, device='cuda',
                      dtype=dtype).requires_grad_()
    weights = [(torch.randn(*shape, device='cuda') * 0.02).requires_grad_()
               for shape in [(1, heads, HEAD_DIM, HEAD_DIM)] * 2 +
               [(HEAD_DIM, 1, 3, 3)]]
    grad_out = torch.randn(batch, tokens, channels + HEAD_DIM, device='cuda',
                           dtype=dtype)

    def step():
        out = fn(qkv, *weights, heads, height, width, SCALE)
        torch.autograd.backward(out, grad_out)
        qkv.grad = None
        for weight in weights:
            weight.grad = None

    return step


def milliseconds(step: Callable) -> float:
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def interleaved_medians(steps: Dict[str, Callable],
                        repeats: int) -> Dict[str, float]:
    names = list(steps)
    for name in names:
        milliseconds(steps[name])  # warm-up: compilation, allocator
    times = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(milliseconds(steps[name]))
    return {name: statistics.median(values) for name, values in times.items()}


def fused_bytes(batch: int, channels: int, height: int, width: int,
                dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 11 * (channels + HEAD_DIM) * batch * height * width * element


def peak_bandwidth(args) -> Tuple[float, str]:
    """(bytes per second, where the figure comes from)."""
    if args.peak_gbs:
        return args.peak_gbs * 1e9, '--peak-gbs'
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    peak = 2 * props.memory_clock_rate * 1e3 * props.memory_bus_width / 8
    return peak, (f'2 x memory clock {props.memory_clock_rate / 1e3:.0f} '
                  f'MHz x bus {props.memory_bus_width} bits')


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit('benchmarks/ttt_kernels.py needs a CUDA GPU; none is '
                 'visible here.')
    if fused is None or not fused.is_available():
        sys.exit('the fused TTT kernels need Triton with a CUDA device')
    dtype = DTYPES[args.dtype]
    peak, source = peak_bandwidth(args)
    print(f'{torch.cuda.get_device_name()}: peak DRAM bandwidth assumed '
          f'{peak / 1e9:.0f} GB/s ({source}); qkv in {args.dtype}, batch '
          f'{args.batch}, forward + backward, medians of {args.repeats}\n')
    print('| image | stage map | C | heads | fused ms | chunked ms | '
          'naive ms | chunked / fused | fused MB moved | fused GB/s | '
          '% of peak |')
    print('| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | '
          '---: | ---: |')
    impls = {'fused': fused.fused_ttt, 'chunked': chunked_ttt,
             'naive': naive_ttt}
    for height, width in args.sizes:
        for (channels, heads), (map_h, map_w) in zip(
                STAGES, stage_maps(height, width)):
            steps = {name: make_step(fn, args.batch, channels, heads, map_h,
                                     map_w, dtype)
                     for name, fn in impls.items()}
            times = interleaved_medians(steps, args.repeats)
            moved = fused_bytes(args.batch, channels, map_h, map_w, dtype)
            rate = moved / (times['fused'] * 1e-3)
            print(f'| {height}x{width} | {map_h}x{map_w} | {channels} | '
                  f'{heads} | {times["fused"]:.3f} | {times["chunked"]:.3f} '
                  f'| {times["naive"]:.3f} | '
                  f'{times["chunked"] / times["fused"]:.2f} | '
                  f'{moved / 1e6:.1f} | {rate / 1e9:.0f} | '
                  f'{100 * rate / peak:.0f} |', flush=True)
            del steps
            torch.cuda.empty_cache()


if __name__ == '__main__':
    main()
