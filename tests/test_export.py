"""OpenVINO export, IR inference, the OpenVINO Model API, and NNCF PTQ/QAT on tiny data."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
import torch

from segcore.cli import main
from segcore.data.dataset import read_mask, read_rgb
from segcore.data.synthetic import generate
from segcore.data.transforms import MEAN, STD
from segcore.export import IR_NAME, META_KEY
from segcore.inference import OpenVINOPredictor, TorchPredictor
from segcore.models import TEMPLATES, create_model
from segcore.optimize import FUSE_ADD, NNCF_EXTENSION_TIMEOUT_S, allow_slow_extension_build, processing_ops

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _write_bundle(folder: Path, template, labels: list[str], input_size=(64, 64), seed: int = 0) -> Path:
    """A bundle of an untrained (randomly initialised, BN statistics randomised) model."""
    torch.manual_seed(seed)
    model = create_model(template, len(labels)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 1, "mdice": 0.0}, folder / "best.pt")
    meta = {
        "template": template.id,
        "template_name": template.name,
        "labels": labels,
        "colors": [[i * 40, 255 - i * 40, 128] for i in range(len(labels))],
        "ignore_index": 255,
        "input_size": list(input_size),
        "mean": list(MEAN),
        "std": list(STD),
        "weights": "best.pt",
    }
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[np.ndarray]:
    gen = generate(tmp_path_factory.mktemp("img") / "raw", "plain", num_train=4, num_val=2, size=(72, 96), seed=5)
    return [read_rgb(p) for p in sorted((gen.root / "images" / "train").iterdir())]


# The smallest template by default; the others (about 25 s each) under -m slow. Every template's
# layers are converted in the default run too, at reduced depth (test_models.test_openvino_conversion).
EXPORTED = [pytest.param(t, id=t.name, marks=() if t is TEMPLATES[0] else pytest.mark.slow) for t in TEMPLATES]


@pytest.mark.parametrize("template", EXPORTED)
def test_every_template_exports_and_the_ir_predicts_like_pytorch(template, tmp_path, images):
    bundle = _write_bundle(tmp_path / "bundle", template, ["a", "b", "c", "d", "e"])
    assert main(["export", str(bundle), "--output", str(tmp_path / "ir")]) == 0
    xml = tmp_path / "ir" / IR_NAME
    model = ov.Core().read_model(xml)
    shape = model.inputs[0].get_partial_shape()
    assert shape[0].get_length() == 1 and shape[1].is_dynamic and shape[2].is_dynamic and shape[3].get_length() == 3
    assert model.get_rt_info(["model_info", "model_type"]).astype(str) == "Segmentation"
    assert model.get_rt_info(["model_info", "labels"]).astype(str) == "a b c d e"

    torch_p, ov_p = TorchPredictor(bundle), OpenVINOPredictor(xml, config=F32)
    assert ov_p.inference_precision == "f32"
    for image in images:  # 72x96 images through a 64x64 network: the in-graph resizes are exercised
        ours, theirs = torch_p.predict(image), ov_p.predict(image)
        assert _agreement(ours, theirs) >= 0.995
    probs = ov_p.probabilities(images[0])
    assert probs.shape == (5, 72, 96) and np.allclose(probs.sum(0), 1, atol=1e-4)


def test_fp16_export_is_smaller_and_still_agrees(trained, tmp_path, images):
    fp32 = trained["ir"].parent  # the session's FP32 export of the same bundle
    assert main(["export", str(trained["run"]), "--output", str(tmp_path / "fp16"), "--precision", "FP16"]) == 0
    assert (tmp_path / "fp16" / "model.bin").stat().st_size < 0.6 * (fp32 / "model.bin").stat().st_size
    a = OpenVINOPredictor(fp32, config=F32).predict(images[1])
    b = OpenVINOPredictor(tmp_path / "fp16", config=F32).predict(images[1])
    assert _agreement(a, b) >= 0.99


# ------------------------------------------------------------ a tiny trained model, end to end


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """The session's tiny Lite-HRNet-s-mod2 (conftest.py): its raw data, bundle, dataset and FP32 IR;
    ``root`` is this module's own folder for outputs."""
    return {"gen": tiny.gen, "run": tiny.cli.run, "dataset": tiny.cli.dataset, "ir": tiny.cli.ir,
            "root": tmp_path_factory.mktemp("trained")}  # fmt: skip


def test_model_api_opens_the_ir_and_its_masks_equal_segcore_predict(trained, tmp_path):
    from model_api.models import Model, SegmentationModel

    pred = tmp_path / "pred"
    val_images = trained["gen"].root / "images" / "val"
    assert main(["predict", str(trained["ir"]), "--input", str(val_images), "--output", str(pred)]) == 0
    model = Model.create_model(str(trained["ir"]))
    assert isinstance(model, SegmentationModel)
    assert list(model.params.labels) == [n.replace(" ", "_") for n in trained["gen"].labels]
    files = sorted(val_images.iterdir())
    assert len(files) == 4
    for path in files:
        result = model(read_rgb(path))
        ours = read_mask(pred / f"{path.stem}.png")
        assert result.resultImage.shape == ours.shape
        assert _agreement(result.resultImage.astype(np.uint8), ours) >= 0.99


def test_eval_and_predict_accept_an_ir(trained, tmp_path, capsys):
    assert main(["eval", str(trained["run"]), "--test-data-root", str(trained["dataset"]), "--json"]) == 0
    torch_scores = json.loads(capsys.readouterr().out)
    assert main(["eval", str(trained["ir"]), "--test-data-root", str(trained["dataset"]), "--json"]) == 0
    ir_scores = json.loads(capsys.readouterr().out)
    assert ir_scores["num_images"] == 4
    assert ir_scores["mdice"] == pytest.approx(torch_scores["mdice"], abs=0.02)
    # the IR's folder works as well as its .xml, and predict writes masks at the image size
    assert main(["predict", str(trained["ir"].parent), "--input", str(trained["gen"].root / "images" / "val"),
                 "--output", str(tmp_path / "m"), "--overlay"]) == 0  # fmt: skip
    masks = sorted((tmp_path / "m").glob("val_*[0-9].png"))
    assert len(masks) == 4 and read_mask(masks[0]).shape == (40, 48)


def _assert_int8(out: Path, mode: str) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == mode and report["fake_quantize_ops"] > 0
    model = ov.Core().read_model(out / IR_NAME)
    types = {node.get_type_name() for node in model.get_ops()}
    assert "FakeQuantize" in types
    meta = json.loads(model.get_rt_info(["model_info", META_KEY]).astype(str))
    assert meta["precision"] == "INT8" and meta["quantization"] == mode
    assert report["int8_ir_bytes"] < report["fp32_ir_bytes"]
    assert 0 <= report["val_mdice_int8"] <= 1
    # pre/post-processing stays float: no fake-quantizer feeds the resizes or the softmax
    names = set(processing_ops(model))
    processing = [node for node in model.get_ops() if node.get_friendly_name() in names]
    assert sorted(node.get_type_name() for node in processing) == ["Interpolate", "Interpolate", "Softmax"]
    for node in processing:
        assert node.input_value(0).get_node().get_type_name() != "FakeQuantize", node.get_friendly_name()
    # nor the fuse layers' additions (where full-network INT8 lost its Dice on CamVid)
    fuse_adds = [
        n for n in model.get_ops() if n.get_type_name() == "Add" and re.fullmatch(FUSE_ADD, n.get_friendly_name())
    ]
    assert fuse_adds
    for node in fuse_adds:
        fed = [node.input_value(i).get_node().get_type_name() for i in range(node.get_input_size())]
        assert "FakeQuantize" not in fed, node.get_friendly_name()
    return report


def test_ptq_of_an_ir_end_to_end(tiny, trained, capsys):
    out = tiny.cli.int8  # `segcore optimize IR --subset-size 2 --json`, run by the session fixture
    printed = tiny.cli.optimize_json
    report = _assert_int8(out, "ptq")
    assert printed["val_mdice_int8"] == report["val_mdice_int8"]
    # the INT8 IR evaluates like any other and scores what the report says
    assert main(["eval", str(out), "--test-data-root", str(trained["dataset"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mdice"] == pytest.approx(report["val_mdice_int8"], abs=1e-6)


def test_ptq_with_accuracy_control(trained):
    out = trained["root"] / "ptq-ac"
    assert main(["optimize", "Lite-HRNet-s-mod2", "--load-weights", str(trained["ir"]), "--train-data-root",
                 str(trained["dataset"]), "--output", str(out), "--max-dice-drop", "0.01"]) == 0  # fmt: skip
    report = _assert_int8(out, "ptq")
    assert report["max_dice_drop"] == 0.01


def test_qat_of_a_bundle_end_to_end(trained, capsys, monkeypatch):
    monkeypatch.delenv("NNCF_EXTENSION_LOAD_TIMEOUT", raising=False)  # QAT sets its own (a slow build is no failure)
    out = trained["root"] / "qat"
    assert main(["optimize", "Lite-HRNet-s-mod2", "--load-weights", str(trained["run"]), "--train-data-root",
                 str(trained["dataset"]), "--output", str(out), "--epochs", "1", "--num-workers", "0",
                 "--subset-size", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    report = _assert_int8(out, "qat")
    assert report["qat"]["epochs"] == 1
    assert main(["eval", str(out / IR_NAME), "--test-data-root", str(trained["dataset"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mdice"] == pytest.approx(report["val_mdice_int8"], abs=1e-6)
    assert os.environ["NNCF_EXTENSION_LOAD_TIMEOUT"] == str(NNCF_EXTENSION_TIMEOUT_S)


def test_nncf_extension_timeout_is_raised_unless_the_user_set_one(monkeypatch):
    monkeypatch.delenv("NNCF_EXTENSION_LOAD_TIMEOUT", raising=False)
    allow_slow_extension_build()
    assert int(os.environ["NNCF_EXTENSION_LOAD_TIMEOUT"]) == NNCF_EXTENSION_TIMEOUT_S > 60  # NNCF's default: 60
    monkeypatch.setenv("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # the user's choice (0: no limit) stays
    allow_slow_extension_build()
    assert os.environ["NNCF_EXTENSION_LOAD_TIMEOUT"] == "0"


# ------------------------------------------------------------------------------- bad input


def _one_error_line(capsys, *fragments: str) -> None:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_ir_missing_its_bin(trained, tmp_path, capsys):
    xml = tmp_path / "lonely.xml"
    xml.write_bytes(trained["ir"].read_bytes())
    assert main(["eval", str(xml), "--test-data-root", str(trained["dataset"])]) == 2
    _one_error_line(capsys, "lonely.xml", "lonely.bin", "missing")
    assert main(["predict", str(xml), "--input", str(trained["gen"].root / "images" / "val"),
                 "--output", str(tmp_path / "p")]) == 2  # fmt: skip
    _one_error_line(capsys, "lonely.bin")
    assert not (tmp_path / "p").exists()


def test_ir_that_is_not_a_segcore_model(trained, tmp_path, capsys):
    import openvino.opset13 as ops

    param = ops.parameter([1, 3, 8, 8], np.float32, name="x")
    foreign = ov.Model([ops.relu(param)], [param], "foreign")
    foreign.set_rt_info("Classification", ["model_info", "model_type"])
    ov.save_model(foreign, tmp_path / "foreign.xml")
    assert main(["eval", str(tmp_path / "foreign.xml"), "--test-data-root", str(trained["dataset"])]) == 2
    _one_error_line(capsys, "foreign.xml", "not a segcore segmentation IR", "Classification")
    (tmp_path / "garbage.xml").write_text("<net>")
    (tmp_path / "garbage.bin").write_bytes(b"")
    assert main(["optimize", "Lite-HRNet-s-mod2", "--load-weights", str(tmp_path / "garbage.xml"),
                 "--train-data-root", str(trained["dataset"]), "--output", str(tmp_path / "o")]) == 2  # fmt: skip
    _one_error_line(capsys, "garbage.xml", "cannot read")
    assert not (tmp_path / "o").exists()


def test_model_of_another_template(trained, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["optimize", "Lite-HRNet-18", "--load-weights", str(trained["ir"]), "--train-data-root",
                 str(trained["dataset"]), "--output", str(out)]) == 2  # fmt: skip
    _one_error_line(capsys, "Lite-HRNet-s-mod2", "not Custom_Semantic_Segmentation_Lite-HRNet-18_OCR")
    assert not out.exists()
    # a bundle whose weights belong to another template than its model.json says
    bundle = tmp_path / "mixed"
    bundle.mkdir()
    (bundle / "best.pt").write_bytes((trained["run"] / "best.pt").read_bytes())
    meta = json.loads((trained["run"] / "model.json").read_text())
    meta["template"] = "Custom_Semantic_Segmentation_Lite-HRNet-18_OCR"
    (bundle / "model.json").write_text(json.dumps(meta))
    assert main(["export", str(bundle), "--output", str(tmp_path / "ir")]) == 2
    _one_error_line(capsys, "best.pt", "do not fit")
    assert not (tmp_path / "ir").exists()


def test_export_refuses_a_non_empty_output_and_optimize_checks_the_mode(trained, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(trained["run"]), "--output", str(tmp_path / "full")]) == 2
    _one_error_line(capsys, "not empty")
    assert main(["optimize", "Lite-HRNet-s-mod2", "--load-weights", str(trained["ir"]), "--mode", "qat",
                 "--train-data-root", str(trained["dataset"]), "--output", str(tmp_path / "q")]) == 2  # fmt: skip
    _one_error_line(capsys, "needs a PyTorch bundle")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_the_ignored_scope_names_what_it_means(template, tmp_path):
    """Every ignored-scope pattern matches in every template, and scope "head" covers the whole
    backbone and nothing of the head but the aggregator's additions."""
    from segcore.export import to_openvino
    from segcore.inference import TorchPredictor
    from segcore.optimize import ignored_names, module_names

    bundle = _write_bundle(tmp_path / "b", template, ["a", "b", "c"])
    predictor = TorchPredictor(bundle)
    model = to_openvino(predictor.model, dict(predictor.meta))
    ops = [n for n in model.get_ops() if n.get_type_name() != "Constant"]
    full, head = set(ignored_names(model, "full")), set(ignored_names(model, "head"))
    weighting = {
        n.get_friendly_name() for n in ops if n.get_type_name() == "Multiply" and "weighting" in n.get_friendly_name()
    }
    assert weighting and weighting <= full
    assert any("aggregator/aten::add" in name for name in full)
    # the fuse layers' additions: every one of them, in every stage module, and no convolution
    fuse_add = re.compile(r"__module\.model\.backbone\.stage\d+\.\d+/aten::add/Add(_\d+)?")
    fuse_adds = {
        n.get_friendly_name() for n in ops if n.get_type_name() == "Add" and fuse_add.fullmatch(n.get_friendly_name())
    }
    assert fuse_adds and fuse_adds <= full
    assert not any(
        n.get_type_name() in ("Convolution", "GroupConvolution") for n in ops if n.get_friendly_name() in full
    )
    assert set(processing_ops(model)) <= full <= head
    # operations renamed by fusion (a convolution becomes "Multiply_123") belong where the operation they feed does
    owners = module_names(model)
    names = [n.get_friendly_name() for n in ops]
    backbone = {name for name in names if owners.get(name, name).startswith("__module.model.backbone.")}
    assert backbone <= head
    convs = [n.get_friendly_name() for n in ops if n.get_type_name() in ("Convolution", "GroupConvolution")]
    assert all(owners.get(c, c).startswith(("__module.model.backbone.", "__module.model.decode_head.")) for c in convs)
    head_convs = [c for c in convs if c not in head]
    assert head_convs and all(owners.get(c, c).startswith("__module.model.decode_head.") for c in head_convs)
    assert all("aggregator/aten::add" in name for name in head - backbone - set(processing_ops(model)))


def test_an_ignored_scope_pattern_that_matches_nothing_is_refused(monkeypatch, trained):
    from segcore import optimize
    from segcore.errors import SegcoreError

    model = ov.Core().read_model(trained["ir"])
    monkeypatch.setattr(optimize, "AGGREGATOR_ADD", r".*no_such_module/aten::add/.*")
    with pytest.raises(SegcoreError, match="aggregator additions .* matches no operation"):
        optimize.ignored_names(model)


def test_ptq_of_the_head_only_leaves_the_backbone_float(tiny, trained):
    from segcore.optimize import ignored_names, optimize

    full = json.loads((tiny.cli.int8 / "report.json").read_text())
    report = optimize(trained["ir"], "Lite-HRNet-s-mod2", trained["dataset"], trained["root"] / "head", subset_size=2,
                      scope="head")  # fmt: skip
    assert report["scope"] == "head" and full["scope"] == "full"
    assert 0 < report["quantized_layers"] < full["quantized_layers"]
    for out, scope in ((trained["root"] / "head", "head"), (tiny.cli.int8, "full")):
        model = ov.Core().read_model(out / IR_NAME)
        kept = set(ignored_names(model, scope))
        for node in model.get_ops():
            if node.get_friendly_name() in kept:
                fed = [node.input_value(i).get_node().get_type_name() for i in range(node.get_input_size())]
                assert "FakeQuantize" not in fed, (scope, node.get_friendly_name())


def test_range_estimators_otx_quantile_extremes_are_wider_than_mean_quantiles(trained):
    """ "quantile_minmax" keeps the lowest low and the highest high of the per-image quantiles,
    "quantile" their means: every activation range of the first holds the second's."""
    from segcore.cli import build_parser
    from segcore.export import read_meta
    from segcore.optimize import RANGE_ESTIMATORS, quantize_ir

    for estimator in RANGE_ESTIMATORS:  # the CLI offers each of them
        args = build_parser().parse_args(["optimize", "Lite-HRNet-s-mod2", "--load-weights", "m", "--train-data-root",
                                          "d", "--output", "o", "--range-estimator", estimator])  # fmt: skip
        assert args.range_estimator == estimator
    fp32 = ov.Core().read_model(trained["ir"])
    meta = read_meta(fp32, trained["ir"])

    def ranges(estimator):
        model = quantize_ir(fp32.clone(), meta, trained["dataset"], subset_size=4, range_estimator=estimator)
        return {
            node.get_friendly_name(): (node.input_value(1).get_node().data, node.input_value(2).get_node().data)
            for node in model.get_ops()
            if node.get_type_name() == "FakeQuantize" and node.input_value(0).get_node().get_type_name() != "Constant"
        }

    mean, extremes = ranges("quantile"), ranges("quantile_minmax")
    assert mean.keys() == extremes.keys() and len(mean) > 10
    # NNCF widens near-empty ranges to a minimum of its own and moves bounds to make zero exact,
    # so the claim is checked over the channels, with a slack of 1% of each range
    contained = wider = total = 0
    for name, (low, high) in mean.items():
        x_low, x_high = extremes[name]
        slack = 0.01 * (high - low)
        contained += int(np.sum((x_low <= low + slack) & (x_high >= high - slack)))
        wider += int(np.sum((x_low < low - slack) | (x_high > high + slack)))
        total += low.size
    assert contained >= 0.9 * total and wider >= 0.1 * total, (contained, wider, total)
    with pytest.raises(Exception, match="unknown range estimator"):
        quantize_ir(fp32.clone(), meta, trained["dataset"], subset_size=2, range_estimator="median")


def test_export_traces_the_plain_shuffle_and_interpolate_whatever_the_input_strides(tmp_path):
    """The export's input reaches the network channels-last (an NHWC image permuted); the trace
    must still take the plain channel shuffle (one ShuffleChannels each) and the Interpolate of
    the cross-resolution weights, not the channels-last and broadcast forms training uses."""
    from segcore.bundle import load_bundle
    from segcore.export import to_openvino
    from segcore.models import litehrnet
    from segcore.optimize import count_ops

    model, meta = load_bundle(_write_bundle(tmp_path / "b", TEMPLATES[0], ["a", "b", "c"]))
    calls = []
    original = litehrnet.channel_shuffle
    try:
        litehrnet.channel_shuffle = lambda x, groups: calls.append(groups) or original(x, groups)
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64))
    finally:
        litehrnet.channel_shuffle = original
    ov_model = to_openvino(model, meta)
    counts = count_ops(ov_model, "Transpose", "Interpolate")
    blocks = [m for m in model.modules() if isinstance(m, litehrnet.CrossResolutionWeighting)]
    # one Reshape-Transpose-Reshape per shuffle (the CPU plugin fuses it into ShuffleChannels),
    # plus the input's NHWC -> NCHW permute
    assert counts["Transpose"] == len(calls) + 1 and len(calls) > 0
    assert counts["Interpolate"] >= sum(len(m.channels) - 1 for m in blocks) > 0


def test_latency_is_the_median_of_single_predict_calls_after_one_warm_up(monkeypatch):
    """The one latency figure (export, optimize, eval, the pipeline, bench_deploy.py): the median of
    single predict(image) calls on the given images, the warm-up call left out."""
    from segcore import scoring

    clock = {"ms": 0.0, "calls": 0}

    def predict(cost):  # each "image" is the milliseconds its prediction takes
        clock["ms"] += cost
        clock["calls"] += 1

    monkeypatch.setattr(scoring.time, "perf_counter", lambda: clock["ms"] / 1000)
    assert scoring.latency_samples(predict, [1.0, 5.0, 3.0], repeats=2) == pytest.approx([1, 5, 3, 1, 5, 3])
    clock["calls"] = 0
    assert scoring.measure_latency(predict, [100.0, 5.0, 3.0, 4.0], repeats=1) == pytest.approx(4.5)
    assert clock["calls"] == 5  # the warm-up call (100 ms) is not a sample
