"""Lite-HRNet models: shapes, gradients, fidelity to the reference, templates, weights, export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segcore.errors import SegcoreError
from segcore.models import TEMPLATES, Template, complexity, create_model, get_template, load_backbone_weights
from segcore.models.litehrnet import LiteHRModule

NAMES = [t.name for t in TEMPLATES]
# OTX 2.6 with 11 classes (litehrnet_s / _18 / _x): parameters in millions.
OTX2_PARAMS_M = {"Lite-HRNet-s-mod2": 0.829, "Lite-HRNet-18-mod2": 1.132, "Lite-HRNet-x-mod3": 1.504}


def _randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so eval-mode comparisons exercise every BN."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    return model


def _reference_fuse_forward(self: LiteHRModule, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The fuse step exactly as HRNet/Lite-HRNet and OTX 1.x/2.x write it (in-place sums)."""
    out = self.layers(xs)
    fused = []
    for i in range(len(self.fuse_layers)):
        y = out[0] if i == 0 else self.fuse_layers[i][0](out[0])
        for j in range(self.num_branches):
            fuse_y = out[j] if i == j else self.fuse_layers[i][j](out[j])
            if fuse_y.size()[-2:] != y.size()[-2:]:
                fuse_y = F.interpolate(fuse_y, size=y.size()[-2:], mode="nearest")
            y += fuse_y
        fused.append(self.relu(y))
    return fused


@pytest.mark.parametrize("template", TEMPLATES, ids=NAMES)
def test_forward_512(template):
    model = create_model(template, num_classes=11).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 512))
    assert out.shape == (1, 11, 512, 512)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("template", TEMPLATES, ids=NAMES)
def test_forward_non_square_and_odd_sizes(template):
    model = create_model(template, num_classes=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 360, 480)).shape == (1, 4, 360, 480)
        # Odd sizes: strided convs round up, so branch sizes are not exact multiples.
        assert model(torch.randn(2, 3, 97, 130)).shape == (2, 4, 97, 130)


@pytest.mark.parametrize("template", TEMPLATES, ids=NAMES)
def test_gradients_reach_every_parameter_down_to_the_stem(template):
    torch.manual_seed(0)
    model = create_model(template, num_classes=3).train()
    target = torch.randint(0, 3, (2, 64, 96))
    target[:, :4] = 255
    loss = F.cross_entropy(model(torch.randn(2, 3, 64, 96)), target, ignore_index=255)
    loss.backward()
    stem_grad = model.backbone.stem.conv1.conv.weight.grad
    assert stem_grad is not None and torch.isfinite(stem_grad).all() and stem_grad.abs().sum() > 0
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert not unused


@pytest.mark.parametrize("name", ["Lite-HRNet-s-mod2", "Lite-HRNet-x-mod3"])
def test_fuse_matches_reference_semantics(name, monkeypatch):
    model = _randomize_batchnorm(create_model(name, num_classes=5)).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        ours = model(x)
        monkeypatch.setattr(LiteHRModule, "forward", _reference_fuse_forward)
        reference = model(x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_18_and_18_mod2_differ_only_in_where_the_aggregator_lives():
    mod2 = _randomize_batchnorm(create_model("Lite-HRNet-18-mod2", num_classes=5)).eval()
    v18 = create_model("Lite-HRNet-18", num_classes=5).eval()
    assert hasattr(v18.backbone, "aggregator") and v18.decode_head.aggregator is None
    renamed = {k.replace("decode_head.aggregator.", "backbone.aggregator."): v for k, v in mod2.state_dict().items()}
    v18.load_state_dict(renamed, strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(v18(x), mod2(x))


def test_complexity_is_computed_and_close_to_references():
    for template in TEMPLATES:
        figures = complexity(create_model(template, num_classes=11), (512, 512))
        assert set(figures) >= {"gflops", "gmacs", "params_m", "size_mb"}
        assert figures["gflops"] > 0 and figures["gmacs"] == pytest.approx(figures["gflops"] / 2)
        assert figures["size_mb"] == pytest.approx(template.reference_size_mb, rel=0.25)
        if template.name in OTX2_PARAMS_M:
            assert figures["params_m"] == pytest.approx(OTX2_PARAMS_M[template.name], rel=0.01)


def test_complexity_keeps_training_mode():
    model = create_model("Lite-HRNet-s-mod2", num_classes=2).train()
    complexity(model, (64, 64))
    assert model.training


def test_template_lookup_by_id_and_name_ignores_case():
    for template in TEMPLATES:
        assert get_template(template.id) is template
        assert get_template(template.name) is template
        assert get_template(template.id.upper()) is template
        assert get_template(f"  {template.name.lower()} ") is template
        assert get_template(template) is template
    assert get_template("custom_semantic_segmentation_lite-hrnet-18-mod2_ocr").name == "Lite-HRNet-18-mod2"
    assert len({t.id for t in TEMPLATES}) == len({t.name for t in TEMPLATES}) == 4


def test_templates_are_immutable_and_carry_training_defaults():
    template = get_template("Lite-HRNet-x-mod3")
    with pytest.raises(dataclasses.FrozenInstanceError):
        template.name = "other"  # type: ignore[misc]
    training = template.training
    assert training.input_size == (512, 512) and training.batch_size == 8
    assert (training.lr, training.adam_eps, training.weight_decay) == (1e-3, 1e-8, 0.0)
    # the defaults the issue-20 ablation chose (OTX 2.6's schedule and init, CE + soft Dice)
    assert (training.warmup_iters, training.warmup_start_factor, training.epochs) == (100, 0.01, 300)
    assert (training.grad_clip_norm, training.plateau_patience, training.loss, training.init) == (
        0.0,
        4,
        "ce_dice",
        "otx",
    )
    assert template.head.aggregator_min_channels == 60


def test_unknown_template_lists_valid_ones():
    with pytest.raises(SegcoreError) as info:
        get_template("Lite-HRNet-99")
    message = str(info.value)
    assert "Lite-HRNet-99" in message and "\n" not in message
    for template in TEMPLATES:
        assert template.id in message and template.name in message
    with pytest.raises(SegcoreError):
        create_model("nope", num_classes=2)


def _otx_style_checkpoint(model: nn.Module) -> dict:
    """A checkpoint as OTX/mmseg writes it: wrapper, prefixes, head and classifier-only keys."""
    state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    state.update({f"decode_head.{k}": v for k, v in model.decode_head.state_dict().items()})
    state["backbone.final_layer.0.weight"] = torch.zeros(8, 4, 1, 1)  # ImageNet-only part
    return {"meta": {"epoch": 3}, "state_dict": state}


def _assert_same_backbone(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_load_backbone_weights_maps_otx_names(tmp_path):
    source = _randomize_batchnorm(create_model("Lite-HRNet-s-mod2", num_classes=2), seed=1)
    path = tmp_path / "otx.pth"
    torch.save(_otx_style_checkpoint(source), path)
    target = create_model("Lite-HRNet-s-mod2", num_classes=7)
    assert load_backbone_weights(target, path) == len(source.backbone.state_dict())
    _assert_same_backbone(source, target)

    # Bare backbone keys, a DDP "module." prefix and an OTX 2 "model.model." prefix work too.
    for prefix in ("", "module.backbone.", "model.model.backbone."):
        target = create_model("Lite-HRNet-s-mod2", num_classes=2)
        torch.save({f"{prefix}{k}": v for k, v in source.backbone.state_dict().items()}, path)
        load_backbone_weights(target, path)
        _assert_same_backbone(source, target)


def test_load_backbone_weights_into_18_without_aggregator(tmp_path):
    source = create_model("Lite-HRNet-18-mod2", num_classes=2)  # aggregator lives in the head
    path = tmp_path / "imagenet_like.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}}, path)
    target = create_model("Lite-HRNet-18", num_classes=2)  # aggregator lives in the backbone
    load_backbone_weights(target, path)
    torch.testing.assert_close(target.backbone.stem.conv1.conv.weight, source.backbone.stem.conv1.conv.weight)


def test_load_backbone_weights_errors_name_file_and_keys(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(_otx_style_checkpoint(create_model("Lite-HRNet-s-mod2", num_classes=2)), path)
    with pytest.raises(SegcoreError) as info:
        load_backbone_weights(create_model("Lite-HRNet-x-mod3", num_classes=2), path)
    message = str(info.value)
    assert str(path) in message and "missing keys" in message and "unexpected keys" in message

    with pytest.raises(SegcoreError, match="not found"):
        load_backbone_weights(create_model("Lite-HRNet-s-mod2", num_classes=2), tmp_path / "absent.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SegcoreError, match="cannot read"):
        load_backbone_weights(create_model("Lite-HRNet-s-mod2", num_classes=2), bad)
    torch.save({"epoch": 1}, bad)
    with pytest.raises(SegcoreError, match="no state dict"):
        load_backbone_weights(create_model("Lite-HRNet-s-mod2", num_classes=2), bad)


def _shallow(template: Template) -> Template:
    """The template with one module of one block per stage: every kind of layer, fewer of them."""
    stages = len(template.backbone.num_modules)
    backbone = dataclasses.replace(template.backbone, num_modules=(1,) * stages, num_blocks=(1,) * stages)
    return dataclasses.replace(template, backbone=backbone)


def _check_openvino(model: nn.Module, ov_model) -> None:
    """The converted model must match PyTorch at a size other than the traced one."""
    import openvino as ov

    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        expected = model(x).numpy()
    result = compiled(x.numpy())[0]
    np.testing.assert_allclose(result, expected, rtol=1e-3, atol=1e-4 * float(np.abs(expected).max()))


@pytest.mark.parametrize("template", TEMPLATES, ids=NAMES)
def test_openvino_conversion(template):
    """Each template's structure (stem, branches, fuse paths, aggregator), one module per stage:
    converting the full templates takes minutes (see the slow test below)."""
    ov = pytest.importorskip("openvino")
    model = _randomize_batchnorm(create_model(_shallow(template), num_classes=3)).eval()
    example = torch.randn(1, 3, 64, 96)
    with torch.no_grad():  # traced as segcore.export traces: once, without torch's trace check
        traced = torch.jit.trace(model, example, check_trace=False, strict=False)
    ov_model = ov.convert_model(traced, example_input=example)
    assert ov_model.inputs[0].get_partial_shape().is_dynamic
    _check_openvino(model, ov_model)


@pytest.mark.slow
@pytest.mark.parametrize("template", TEMPLATES, ids=NAMES)
def test_full_templates_export(template, request):
    """Opt-in (``pytest -m slow``, 3-4 minutes): the full templates through ``torch.export`` with
    dynamic height and width, and through ``openvino.convert_model`` from both the exported
    program and the module."""
    if "slow" not in (request.config.option.markexpr or ""):
        pytest.skip("opt-in: run with -m slow")
    import openvino as ov

    model = _randomize_batchnorm(create_model(template, num_classes=3)).eval()
    example = torch.randn(1, 3, 64, 96)
    dims = {"x": {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    program = torch.export.export(model, (example,), dynamic_shapes=dims)
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
    _check_openvino(model, ov.convert_model(program))
    _check_openvino(model, ov.convert_model(model, example_input=example))


def test_cli_templates_json_and_errors(capsys):
    from segcore.cli import main

    assert main(["templates", "--json", "--input-size", "64", "64"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == NAMES
    for row in rows:
        assert {"id", "name", "gflops", "params_m", "size_mb"} <= set(row)
        assert row["gflops"] > 0 and row["params_m"] > 0.5 and row["size_mb"] > 3

    assert main(["templates", "--input-size", "64", "64"]) == 0
    table = capsys.readouterr().out
    assert "GFLOPs" in table and all(t.id in table and t.name in table for t in TEMPLATES)

    assert main(["templates", "--num-classes", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segcore templates: error:") and "\n" not in err


def test_models_do_not_import_tracking_storage_or_pipelines():
    code = "import sys, segcore.models; print(sorted({'mlflow', 'boto3', 'kfp'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "size, out", [((64, 96), (8, 12)), ((64, 96), (64, 96)), ((63, 90), (8, 12)), ((5, 7), (2, 3))]
)
def test_pool_to_equals_adaptive_average_pooling(size, out):
    from segcore.models.litehrnet import _pool_to

    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(_pool_to(x, out), F.adaptive_avg_pool2d(x, out))


def test_logits_go_straight_to_the_requested_size():
    model = create_model(get_template("Lite-HRNet-s-mod2"), 3).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        head = model.decode_head(model.backbone(x))
        resized = model(x, size=(40, 50))
        assert model(x).shape == (1, 3, 64, 64)
    assert resized.shape == (1, 3, 40, 50)
    torch.testing.assert_close(resized, F.interpolate(head, size=(40, 50), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("shape", [(2, 40, 8, 6), (1, 6, 1, 1), (2, 4, 3, 1)])
def test_channel_shuffle_keeps_the_memory_format(shape):
    from segcore.models.litehrnet import channel_shuffle

    x = torch.randn(shape)
    plain = channel_shuffle(x, 2)
    assert torch.equal(plain[:, 1], x[:, shape[1] // 2]) and plain.is_contiguous()
    nhwc = channel_shuffle(x.contiguous(memory_format=torch.channels_last), 2)
    assert torch.equal(nhwc, plain) and nhwc.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 20, 8, 6), (1, 3, 1, 1), (2, 2, 3, 1)])
@pytest.mark.parametrize("order", [torch.contiguous_format, torch.channels_last])
def test_concat_shuffle_equals_cat_then_shuffle_forward_and_backward(shape, order):
    from segcore.models.litehrnet import channel_shuffle, concat_shuffle

    torch.manual_seed(0)
    whole = torch.randn(shape[0], 2 * shape[1], *shape[2:]).contiguous(memory_format=order)
    first = whole.chunk(2, dim=1)[0].detach().requires_grad_()  # a view, as the blocks pass it
    second = torch.randn(shape).contiguous(memory_format=order).requires_grad_()
    a, b = first.detach().clone().requires_grad_(), second.detach().clone().requires_grad_()
    got, want = concat_shuffle(first, second), channel_shuffle(torch.cat((a, b), dim=1), 2)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=order)
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    assert torch.equal(first.grad, a.grad) and torch.equal(second.grad, b.grad)


@pytest.mark.parametrize("size", [(8, 12), (7, 12)])
@pytest.mark.parametrize("order", [torch.contiguous_format, torch.channels_last])
def test_scale_by_equals_multiplying_by_the_nearest_upsampled_weights(size, order):
    from segcore.models.litehrnet import _scale_by

    x = torch.randn(2, 6, *size).contiguous(memory_format=order).requires_grad_()
    w = torch.rand(2, 6, 2, 3, requires_grad=True)
    expected = x * F.interpolate(w, size=size, mode="nearest")
    got = _scale_by(x, w)
    assert torch.equal(got, expected) and got.is_contiguous(memory_format=order)
    grad = torch.randn_like(expected)
    assert all(
        torch.allclose(a, b, atol=1e-6)
        for a, b in zip(
            torch.autograd.grad(got, (x, w), grad), torch.autograd.grad(expected, (x, w), grad), strict=True
        )
    )


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "w_size"),
    [
        (torch.float64, torch.float64, (4, 3)),
        (torch.bfloat16, torch.bfloat16, (2, 3)),
        (torch.bfloat16, torch.float32, (2, 3)),
        (torch.float64, torch.float64, (8, 12)),  # one weight per pixel: a plain product
    ],
)
def test_scale_by_gradients_match_autograd_in_every_dtype(x_dtype, w_dtype, w_size):
    """The hand-written backward pass (sum pooling for the weights' gradient) against autograd
    through the nearest-upsampled product, in channels-last order, with mixed dtypes promoted as
    PyTorch promotes them."""
    from segcore.models.litehrnet import _scale_by

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 12, dtype=x_dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(2, 5, *w_size, dtype=w_dtype).requires_grad_()
    expected = x * F.interpolate(w, size=(8, 12), mode="nearest")
    got = _scale_by(x, w)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    grad = torch.randn_like(expected)
    ours, theirs = torch.autograd.grad(got, (x, w), grad), torch.autograd.grad(expected, (x, w), grad)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == b.dtype
        tolerance = 1e-12 if a.dtype == torch.float64 else 2e-2 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv_in_bf16_autocast_matches_the_plain_convolution(stride):
    """A strided depthwise convolution under CPU bf16 autocast takes its own backward pass (the
    input's gradient from fp32): the output and the weights' gradient equal plain autocast's
    exactly; the input's gradient is the float64 one rounded to bf16."""
    from segcore.models.litehrnet import DepthwiseConv2d

    torch.manual_seed(0)
    ours = DepthwiseConv2d(6, 6, 3, stride, 1, groups=6, bias=False).to(memory_format=torch.channels_last)
    plain = torch.nn.Conv2d(6, 6, 3, stride, 1, groups=6, bias=False).to(memory_format=torch.channels_last)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 16, 12).contiguous(memory_format=torch.channels_last).bfloat16()
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = ours(a), plain(b)
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    grad = torch.randn_like(want)
    got.backward(grad)
    want.backward(grad)
    assert torch.equal(ours.weight.grad, plain.weight.grad)
    reference = torch.nn.grad.conv2d_input(
        x.shape, ours.weight.double().bfloat16().double(), grad.double(), stride, 1, 1, 6
    )
    assert a.grad.dtype == torch.bfloat16 and a.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a.grad.double(), reference.bfloat16().double(), rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # outside autocast, in fp32: the plain convolution
        assert torch.equal(ours(x.float()), plain(x.float()))
