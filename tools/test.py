"""Test a detector (mmdet config) or a segmentor (mmseg config).

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE|DIR]
        [--show-dir DIR] [--tta] [--cfg-options K=V ...] [--launcher pytorch]
"""
from mmvit3.cli import test

if __name__ == '__main__':
    test()
