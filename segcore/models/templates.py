"""The four Lite-HRNet templates of OpenVINO Training Extensions, as immutable records.

Architectures follow the OTX 1.x configs (``otx/algorithms/segmentation/configs/ocr_lite_hrnet_*``
and ``otx/algorithms/common/adapters/mmcv/configs/backbones/lite_hrnet_{s,18,x}.py``):

* every template uses spatial weighting v1 (squeeze-and-excitation) and no neighbour weighting
  (s sets both explicitly, 18 and x rely on the defaults, x sets v1 explicitly);
* every aggregator runs without merge normalisation and without concatenation; only x-mod3
  widens narrow branches (``aggregator_min_channels=60``);
* every head: kernel 1, one conv whose ReLU OTX removes, no input concat, no dropout, BN, no
  output normalisation, ``align_corners=False``, ignore index 255.

Lite-HRNet-18 vs Lite-HRNet-18-mod2: same backbone and the same computation. In the OTX 1.0
model zoo (``model_preparation_algorithm``: ``models/segmentation/_base_/ocr_litehrnet18.py``
vs ``ocr_litehrnet18_mod2.py``) "18" runs the iterative aggregator at the end of the backbone
(``out_aggregator.enable=True``) and a single-input FCN head, while "mod2" keeps the backbone
multi-branch and aggregates inside the head (``enable_aggregator=True``). That placement is what
``aggregator_in_backbone`` reproduces; it moves the aggregator's weights from ``decode_head.`` to
``backbone.``. The older OTE 0.x "18" also carried an OCR head (hence "_OCR"); like the later
OTX releases, none of these templates attaches one. The reference GFLOPs/MB of the table date
from those OTE 0.x models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from segcore.errors import SegcoreError

__all__ = [
    "TEMPLATES",
    "BackboneConfig",
    "HeadConfig",
    "Recipe",
    "Template",
    "get_template",
]

_WEIGHTS_URL = (
    "https://storage.openvinotoolkit.org/repositories/openvino_training_extensions/models/custom_semantic_segmentation/"
)


@dataclass(frozen=True)
class BackboneConfig:
    """Lite-HRNet backbone settings (one tuple entry per stage, channels of the last stage)."""

    stem_channels: int
    stem_strides: tuple[int, int]
    extra_stride: bool
    num_modules: tuple[int, ...]
    num_branches: tuple[int, ...]
    num_blocks: tuple[int, ...]
    reduce_ratios: tuple[int, ...]
    channels: tuple[int, ...]

    def __post_init__(self) -> None:
        stages = len(self.num_modules)
        if not (len(self.num_branches) == len(self.num_blocks) == len(self.reduce_ratios) == stages):
            raise ValueError("num_modules, num_branches, num_blocks and reduce_ratios need one entry per stage")
        if self.num_branches[-1] != len(self.channels):
            raise ValueError("channels must list every branch of the last stage")


@dataclass(frozen=True)
class HeadConfig:
    """FCN head settings."""

    channels: int
    aggregator_min_channels: int = 0
    aggregator_in_backbone: bool = False


@dataclass(frozen=True)
class Recipe:
    """The training recipe the templates share, written once: ``TrainConfig`` (segcore.training)
    is this record plus the run's own settings, under the same names.

    The defaults are what measured best per epoch on CamVid (docs/benchmarks.md, issue 20): OTX
    2.6's schedule and initialisation (warm-up from lr/100 over 100 steps, plateau patience 4, no
    gradient clipping, kaiming only for the ConvModule-like convolutions) with cross-entropy plus a
    soft Dice term. The reference's (OTX 1.x) recipe stays one option away: ``RECIPES["reference"]``
    (``segcore train --recipe reference``)."""

    input_size: tuple[int, int] = (512, 512)  # height, width
    batch_size: int = 8
    lr: float = 1e-3  # Adam
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0: no clipping (the reference clips at L2 norm 40)
    warmup_iters: int = 100
    warmup_start_factor: float = 0.01
    plateau_factor: float = 0.1
    plateau_patience: int = 4
    min_lr: float = 1e-6
    early_stop_start_epoch: int = 3
    early_stop_patience: int = 8
    epochs: int = 300
    loss: str = "ce_dice"  # or "cross_entropy" (plain, mean over valid pixels), "max_pooling"
    dice_weight: float = 1.0  # weight of the soft Dice term of "ce_dice"
    init: str = "otx"  # weight initialisation from scratch: "torch", "kaiming" or "otx"
    ema_decay: float = 0.0  # >0: validate and ship an exponential moving average of the weights
    max_pooling_ratio: float = 0.25
    max_pooling_p: float = 1.7
    seed: int = 42


# Named recipes: (Recipe overrides, AugmentConfig overrides) on top of the defaults. "reference" is
# OTX 1.x's documented recipe (segcore's defaults until the issue-20 ablation): rescale 0.5-2.0 and
# crop, flip, rotation, image mixing, photometric distortion, the max-pooling loss, clipping at 40,
# warm-up for 80 steps from lr/3, plateau patience 5.
RECIPES: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "reference": (
        {
            "loss": "max_pooling",
            "init": "torch",
            "grad_clip_norm": 40.0,
            "warmup_iters": 80,
            "warmup_start_factor": 1 / 3,
            "plateau_patience": 5,
        },
        {"crop_mode": "rescale_crop", "rotate_p": 0.5, "mix_p": 0.5, "photometric_p": 1.0},
    ),
}


@dataclass(frozen=True)
class Template:
    """A model template: architecture, training defaults and the published figures."""

    id: str
    name: str
    backbone: BackboneConfig
    head: HeadConfig
    training: Recipe = field(default_factory=Recipe)
    reference_gflops: float = 0.0  # OTX template metadata ("gigaflops")
    reference_size_mb: float = 0.0  # OTX template metadata ("size")
    pretrained_url: str = ""  # public ImageNet backbone checkpoint used by OTX (load_from)


# Lite-HRNet-18 and 18-mod2 share the backbone; they differ in where the aggregator sits.
_LITE_HRNET_18 = BackboneConfig(
    stem_channels=32,
    stem_strides=(2, 2),
    extra_stride=False,
    num_modules=(2, 4, 2),
    num_branches=(2, 3, 4),
    num_blocks=(2, 2, 2),
    reduce_ratios=(8, 8, 8),
    channels=(40, 80, 160, 320),
)

TEMPLATES: tuple[Template, ...] = (
    Template(
        id="Custom_Semantic_Segmentation_Lite-HRNet-s-mod2_OCR",
        name="Lite-HRNet-s-mod2",
        backbone=BackboneConfig(
            stem_channels=32,
            stem_strides=(2, 2),
            extra_stride=True,
            num_modules=(4, 4),
            num_branches=(2, 3),
            num_blocks=(2, 2),
            reduce_ratios=(8, 8),
            channels=(60, 120, 240),
        ),
        head=HeadConfig(channels=60),
        reference_gflops=1.82,
        reference_size_mb=3.5,
        pretrained_url=_WEIGHTS_URL + "litehrnetsv2_imagenet1k_rsc.pth",
    ),
    Template(
        id="Custom_Semantic_Segmentation_Lite-HRNet-18_OCR",
        name="Lite-HRNet-18",
        backbone=_LITE_HRNET_18,
        head=HeadConfig(channels=40, aggregator_in_backbone=True),
        reference_gflops=3.45,
        reference_size_mb=4.5,
        pretrained_url=_WEIGHTS_URL + "litehrnet18_imagenet1k_rsc.pth",
    ),
    Template(
        id="Custom_Semantic_Segmentation_Lite-HRNet-18-mod2_OCR",
        name="Lite-HRNet-18-mod2",
        backbone=_LITE_HRNET_18,
        head=HeadConfig(channels=40),
        reference_gflops=3.63,
        reference_size_mb=4.8,
        pretrained_url=_WEIGHTS_URL + "litehrnet18_imagenet1k_rsc.pth",
    ),
    Template(
        id="Custom_Semantic_Segmentation_Lite-HRNet-x-mod3_OCR",
        name="Lite-HRNet-x-mod3",
        backbone=BackboneConfig(
            stem_channels=60,
            stem_strides=(2, 1),
            extra_stride=False,
            num_modules=(2, 4, 4, 2),
            num_branches=(2, 3, 4, 5),
            num_blocks=(2, 2, 2, 2),
            reduce_ratios=(2, 4, 8, 8),
            channels=(18, 60, 80, 160, 320),
        ),
        head=HeadConfig(channels=60, aggregator_min_channels=60),
        reference_gflops=13.97,
        reference_size_mb=6.4,
        pretrained_url=_WEIGHTS_URL + "litehrnetxv3_imagenet1k_rsc.pth",
    ),
)


def get_template(name_or_id: str | Template) -> Template:
    """Look a template up by ID or name, ignoring case; a ``Template`` is returned as is."""
    if isinstance(name_or_id, Template):
        return name_or_id
    key = str(name_or_id).strip().lower()
    for template in TEMPLATES:
        if key in (template.id.lower(), template.name.lower()):
            return template
    valid = ", ".join(f"{t.name} ({t.id})" for t in TEMPLATES)
    raise SegcoreError(f"unknown model template {name_or_id!r}; valid templates: {valid}")
