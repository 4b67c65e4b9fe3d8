"""bench/tensorrt_check.py off a GPU: each route says why it did not run, and a report fails only on an
error or a comparison past its tolerance (the GPU run: bench/gpu_check.sh)."""

import pytest

tensorrt_check = pytest.importorskip("bench.tensorrt_check")


def test_without_cuda_the_whole_check_is_skipped_and_passes():
    report = tensorrt_check.run("tiny")
    assert report["skipped"] == "TensorRT needs a CUDA device" and not tensorrt_check.failed(report)


def test_each_route_names_what_is_missing_here():
    model = tensorrt_check.random_model("tiny")
    ort = tensorrt_check.onnxruntime_trt(model)
    assert "TensorrtExecutionProvider" in ort["skipped"] or "onnxruntime is not installed" in ort["skipped"]
    assert "torch_tensorrt is not installed" in tensorrt_check.torch_tensorrt_route(model)["skipped"]


def test_a_report_fails_on_an_error_or_a_comparison_past_tolerance():
    ok = {"comparisons": [{"ok": True}]}
    assert not tensorrt_check.failed({"shape": "tiny", "a": ok, "b": {"skipped": "not installed"}})
    assert tensorrt_check.failed({"a": ok, "b": {"error": "RuntimeError: no engine"}})
    assert tensorrt_check.failed({"a": {"comparisons": [{"ok": True}, {"ok": False}]}})
