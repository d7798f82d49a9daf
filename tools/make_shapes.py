"""Write the synthetic shapes dataset in the COCO and ADE20K layouts.

    python tools/make_shapes.py [OUT_DIR] [--num-train N] [--num-val N]
        [--size H W] [--seed S] [--max-shapes K]

Same arguments, same files: every image is drawn from its own seed.
"""
import argparse

from mmvit3.shapes import make_shapes_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out_dir', nargs='?', default='data/shapes')
    parser.add_argument('--num-train', type=int, default=1000)
    parser.add_argument('--num-val', type=int, default=50)
    parser.add_argument(
        '--size', type=int, nargs=2, default=(64, 64), metavar=('H', 'W'))
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--max-shapes', type=int, default=3, help='shapes per image, at most')
    args = parser.parse_args()
    roots = make_shapes_dataset(
        args.out_dir,
        num_train=args.num_train,
        num_val=args.num_val,
        image_size=tuple(args.size),
        seed=args.seed,
        max_shapes=args.max_shapes)
    print(f'{args.num_train} train + {args.num_val} val images: '
          f"COCO layout in {roots['coco']}, ADE20K layout in {roots['ade']}")


if __name__ == '__main__':
    main()
