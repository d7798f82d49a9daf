# H-ViT3-T with SegFormer's all-MLP decode head on ADE20K: mmseg's SegFormer
# recipe (160k iterations, 8 x 2 images, 512x512 crops, AdamW lr 6e-5 wd
# 0.01 with the head at 10x lr and no decay on norms, 1500 warm-up
# iterations then poly decay). Not one of the published recipes.
_base_ = 'mmseg::segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py'
custom_imports = dict(imports=['mmvit3'], allow_failed_imports=False)

# The authors' ImageNet-1K checkpoint (their release link; downloaded once
# into the torch hub cache, or $MMVIT3_CACHE). Offline, point at a copy with
# --cfg-options model.backbone.init_cfg.checkpoint=PATH
pretrained = 'https://cloud.tsinghua.edu.cn/f/f0c7c73ceabe49b7b161/?dl=1'
model = dict(
    backbone=dict(
        _delete_=True,
        type='HViT3',
        arch='tiny',
        drop_path_rate=0.2,
        out_indices=(0, 1, 2, 3),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    decode_head=dict(in_channels=[64, 128, 320, 512]))
