"""Train a detector (mmdet config) or a segmentor (mmseg config).

    python tools/train.py CONFIG [--work-dir DIR] [--amp] [--resume [PATH]]
        [--auto-scale-lr] [--cfg-options K=V ...] [--launcher pytorch]
"""
from mmvit3.cli import train

if __name__ == '__main__':
    train()
