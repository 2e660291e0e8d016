"""Devices and mixed precision (segcore.devices): how --device and --precision resolve, bf16
autocast against fp32, bundles that do not depend on where they were trained, and the CUDA paths
(which run where CUDA exists and skip elsewhere)."""

from __future__ import annotations

import itertools
import json
import platform
import sys

import pytest
import torch

from segcore import devices
from segcore.cli import main
from segcore.data.synthetic import generate
from segcore.errors import SegcoreError
from segcore.models import create_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
TINY = ["--epochs", "1", "--input-size", "32x32", "--batch-size", "4", "--num-workers", "0", "--no-tracking"]


def test_device_resolution():
    assert devices.resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert devices.resolve_device(None) == devices.resolve_device("auto")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "cuda:-1", "tpu"):
        with pytest.raises(SegcoreError, match="expected auto"):
            devices.resolve_device(bad)
    if not CUDA:
        with pytest.raises(SegcoreError, match="CUDA asked for, but"):
            devices.resolve_device("cuda")
    with pytest.raises(SegcoreError, match="CUDA"):
        devices.resolve_device(f"cuda:{torch.cuda.device_count() if CUDA else 0}")


def test_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert devices.resolve_precision("bf16", cpu) == "bf16"  # asked for: emulated where not native
    assert devices.resolve_precision("FP32", cpu) == "fp32"
    with pytest.raises(SegcoreError, match="fp16 needs a CUDA device"):
        devices.resolve_precision("fp16", cpu)
    with pytest.raises(SegcoreError, match="expected one of"):
        devices.resolve_precision("fp64", cpu)


def test_memory_format_resolution():
    assert devices.resolve_memory_format("auto", torch.device("cpu")) == "channels_last"
    assert devices.resolve_memory_format(None, torch.device("cuda")) == "contiguous"  # not measured there
    assert devices.resolve_memory_format("channels-last", torch.device("cuda")) == "channels_last"
    assert devices.resolve_memory_format("Contiguous", torch.device("cpu")) == "contiguous"
    with pytest.raises(SegcoreError, match="--memory-format 'nhwc': expected auto, channels_last or contiguous"):
        devices.resolve_memory_format("nhwc", torch.device("cpu"))


def test_heap_retention_limit_sets_glibcs_mmap_threshold(monkeypatch):
    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(devices.sys, "platform", "linux")
    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.delenv("SEGCORE_MMAP_THRESHOLD_MB", raising=False)
    assert devices.limit_heap_retention() == 0 and calls == []  # glibc's own rule unless asked
    monkeypatch.setenv("SEGCORE_MMAP_THRESHOLD_MB", "4")
    assert devices.limit_heap_retention() == 4 << 20 and calls == [(-3, 4 << 20)]  # M_MMAP_THRESHOLD
    monkeypatch.setenv("SEGCORE_MMAP_THRESHOLD_MB", "0.5")
    assert devices.limit_heap_retention() == 1 << 19 and calls[-1] == (-3, 1 << 19)
    monkeypatch.setenv("SEGCORE_MMAP_THRESHOLD_MB", "0")
    assert devices.limit_heap_retention() == 0 and len(calls) == 2
    monkeypatch.setenv("SEGCORE_MMAP_THRESHOLD_MB", "lots")
    with pytest.raises(SegcoreError, match="SEGCORE_MMAP_THRESHOLD_MB='lots'"):
        devices.limit_heap_retention()
    monkeypatch.setenv("SEGCORE_MMAP_THRESHOLD_MB", "4")
    monkeypatch.setattr(devices.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert devices.limit_heap_retention() == 0  # not glibc: left alone


def test_val_cache_size_comes_from_the_environment(monkeypatch):
    from segcore.training import _val_cache_mb

    monkeypatch.delenv("SEGCORE_VAL_CACHE_MB", raising=False)
    assert _val_cache_mb() == 512.0
    monkeypatch.setenv("SEGCORE_VAL_CACHE_MB", "0")
    assert _val_cache_mb() == 0.0
    monkeypatch.setenv("SEGCORE_VAL_CACHE_MB", "1g")
    with pytest.raises(SegcoreError, match=r"SEGCORE_VAL_CACHE_MB='1g': give a number of MiB \(0: read the val"):
        _val_cache_mb()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not sys.platform.startswith("linux"), reason="glibc only")
def test_heap_retention_limit_is_accepted_by_glibc():
    import os
    import subprocess

    code = "from segcore import devices; print(devices.limit_heap_retention())"  # in its own process
    env = {**os.environ, "SEGCORE_MMAP_THRESHOLD_MB": "4"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(done.stdout.strip().splitlines()[-1]) == 4 << 20


def test_channels_last_training_step_matches_contiguous():
    """The same computation in either memory order: in float64 the loss and every gradient agree to
    1e-9 (in float32 the kernels' rounding differs, and batch norm over a tiny batch amplifies it to
    about 1% in the stem's gradients), and every activation of the channels-last network stays
    channels-last (no silent fall-back to copies in the other order)."""
    torch.manual_seed(0)
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    results = {}
    for dtype, order in itertools.product(
        (torch.float32, torch.float64), (torch.contiguous_format, torch.channels_last)
    ):
        torch.manual_seed(1)
        model = create_model("Lite-HRNet-18", 4).train().to(dtype=dtype, memory_format=order)
        formats = []
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
                module.register_forward_hook(
                    lambda m, i, o, seen=formats, order=order: seen.append(o.is_contiguous(memory_format=order))
                )
        loss = torch.nn.functional.cross_entropy(model(images.to(dtype).contiguous(memory_format=order)), masks)
        loss.backward()
        assert all(formats) and len(formats) > 300
        results[dtype, order] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float64, 1e-9)):
        (loss_a, grads_a), (loss_b, grads_b) = (
            results[dtype, torch.contiguous_format],
            results[dtype, torch.channels_last],
        )
        assert loss_b == pytest.approx(loss_a, rel=tolerance)
    assert (grads_b - grads_a).norm() <= 1e-9 * grads_a.norm()


def test_cpu_flags_are_read_from_cpuinfo():
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    assert devices.cpu_has_native_bf16() == any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def _train(tmp_path, out, *flags: str) -> int:
    """`segcore train` of Lite-HRNet-s-mod2 on tiny generated data (1 epoch at 32x32) with ``flags``."""
    gen = generate(tmp_path / "raw", "plain", num_train=8, num_val=4, size=(40, 48), num_classes=3, seed=5)
    return main(["train", "Lite-HRNet-s-mod2", "--train-data-root", str(gen.root), "--output", str(out), *flags, *TINY])


BF16_LOSS_RTOL = 0.01  # measured: 2e-4 relative (Lite-HRNet-s-mod2, 2x3x64x64, max-pooling loss)


def test_bf16_autocast_step_one_loss_is_close_to_fp32():
    from segcore.losses import MaxPoolingCrossEntropy

    torch.manual_seed(0)
    model = create_model("Lite-HRNet-s-mod2", 4).train()
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    criterion = MaxPoolingCrossEntropy()
    cpu = torch.device("cpu")
    losses = {}
    for precision in ("fp32", "bf16"):
        with devices.autocast(cpu, precision):
            logits = model(images)
        assert logits.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        losses[precision] = criterion(logits.float(), masks).item()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=BF16_LOSS_RTOL)


def test_a_bundle_trained_in_bf16_records_it_and_evaluates_in_fp32(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tmp_path, out, "--device", "cpu", "--precision", "bf16") == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["train_precision"] == "bf16" and meta["train_device"] == "cpu"
    assert meta["train_memory_format"] == "channels_last"  # auto on a CPU
    assert meta["training_config"]["precision"] == "bf16"
    state = torch.load(out / "best.pt", map_location="cpu", weights_only=True)["model"]
    assert all(t.dtype != torch.bfloat16 for t in state.values())  # the weights stay fp32
    capsys.readouterr()
    assert main(["eval", str(out), "--test-data-root", str(out / "dataset"), "--json", "--no-tracking"]) == 0
    # validation runs in fp32 whatever the training's precision: eval gives the recorded Dice
    assert json.loads(capsys.readouterr().out)["mdice"] == pytest.approx(meta["best_val_mdice"], abs=1e-6)


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_asked_for_on_a_machine_without_it_fails_at_once(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tmp_path, out, "--device", "cuda") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA asked for, but" in err[0], err
    assert not out.exists()


@needs_cuda
def test_cuda_training_gives_a_bundle_the_cpu_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tmp_path, out, "--device", "cuda", "--precision", "auto") == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["train_device"].startswith("cuda") and meta["train_precision"] in ("bf16", "fp16")
    capsys.readouterr()
    assert main(["eval", str(out), "--test-data-root", str(out / "dataset"), "--json", "--no-tracking"]) == 0
    assert json.loads(capsys.readouterr().out)["mdice"] == pytest.approx(meta["best_val_mdice"], abs=1e-3)


@needs_cuda
def test_fp16_uses_a_gradient_scaler_on_cuda():
    scaler = devices.grad_scaler(torch.device("cuda"), "fp16")
    assert scaler.is_enabled()
    assert not devices.grad_scaler(torch.device("cpu"), "bf16").is_enabled()


def test_eval_and_predict_take_a_device_for_bundles_only(tiny, tmp_path, capsys):
    assert main(["eval", str(tiny.cli.run), "--test-data-root", str(tiny.cli.dataset), "--device", "cpu", "--json",
                 "--no-tracking"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["num_images"] == 4
    assert main(["eval", str(tiny.cli.ir), "--test-data-root", str(tiny.cli.dataset), "--device", "cuda:0",
                 "--no-tracking"]) == 2  # fmt: skip
    assert "applies to PyTorch bundles" in capsys.readouterr().err
    if not CUDA:
        images = tiny.raw / "images" / "val"
        assert main(["predict", str(tiny.cli.run), "--input", str(images), "--output", str(tmp_path / "p"),
                     "--device", "cuda"]) == 2  # fmt: skip
        assert "CUDA asked for, but" in capsys.readouterr().err


@needs_cuda
def test_a_bundle_scores_the_same_on_cuda_and_on_the_cpu(tiny, capsys):
    scores = {}
    for device in ("cpu", "cuda"):
        assert main(["eval", str(tiny.cli.run), "--test-data-root", str(tiny.cli.dataset), "--device", device,
                     "--json", "--no-tracking"]) == 0  # fmt: skip
        scores[device] = json.loads(capsys.readouterr().out)["mdice"]
    assert scores["cuda"] == pytest.approx(scores["cpu"], abs=1e-3)
