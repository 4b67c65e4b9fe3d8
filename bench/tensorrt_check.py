"""TensorRT on a GPU (issue 20's optional path): the exported graph (model/interop's PortableGPT,
what TorchScript and ONNX export) run by TensorRT and compared with the eager model as every
export is verified (model/interop/verify.py: max |diff| / max |logit|, greedy agreement).

    python -m bench.tensorrt_check [--shape tiny|gpt2-124M] [--out FILE]

Two routes, each tried where its package imports: ONNX Runtime's TensorRT provider on the
exported model.onnx (onnxruntime-gpu built with TensorRT), and torch_tensorrt compiling the
PortableGPT module. Float32 graphs; TensorRT may use TF32 on Ampere and later, so a route is
judged against the float16 tolerance and the report gives the figures. Neither installed: the
report says so and the script exits 0 (bench/gpu_check.sh runs it; CPU CI never needs it). A route
that is installed but fails to build or run is reported with its error and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from bench.models import SHAPES
from model.gpt import GPT, GPTConfig
from model.interop.graph import PortableGPT
from model.interop.verify import TOLERANCE, check_forward
from model.tokenizer import CharTokenizer

log = logging.getLogger(__name__)
SHAPE_CHOICES = ("tiny", *SHAPES)


def random_model(shape: str) -> GPT:
    n_layer, n_head, n_embd = (2, 2, 64) if shape == "tiny" else SHAPES[shape]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=50304 if shape != "tiny" else 96, n_layer=n_layer,
                          n_head=n_head, n_embd=n_embd)).eval()
    model.tokenizer = CharTokenizer([chr(c) for c in range(32, 127)])  # export writes a tokenizer spec
    return model


def judged(comparisons) -> list[dict]:
    """Each comparison as a row, judged against float16's tolerance (TF32 inside TensorRT)."""
    tol = TOLERANCE[torch.float16]
    return [{"shape": c.shape, "rel": c.rel, "argmax_agree": c.argmax_agree, "ok": c.rel <= tol, "tol": tol}
            for c in comparisons]


def onnxruntime_trt(model: GPT) -> dict:
    try:
        import onnxruntime as ort
    except ImportError as err:
        return {"skipped": f"onnxruntime is not installed ({err})"}
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} has no TensorrtExecutionProvider "
                           f"(providers: {', '.join(ort.get_available_providers())}); onnxruntime-gpu with TensorRT"}
    from model.interop import export_model
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, "onnx", Path(tmp) / "onnx")  # verified on the CPU provider first
        sess = ort.InferenceSession(str(Path(tmp) / "onnx" / "model.onnx"),
                                    providers=["TensorrtExecutionProvider", "CUDAExecutionProvider"])
        if sess.get_providers()[0] != "TensorrtExecutionProvider":
            return {"error": f"the session fell back to {sess.get_providers()}"}
        run = lambda idx: torch.from_numpy(sess.run(None, {"idx": idx.numpy()})[0])  # noqa: E731
        return {"version": ort.__version__, "comparisons": judged(check_forward(model, run))}


def torch_tensorrt_route(model: GPT) -> dict:
    try:
        import torch_tensorrt
    except ImportError as err:
        return {"skipped": f"torch_tensorrt is not installed ({err})"}
    gpu = PortableGPT(model).to("cuda").eval()
    block = model.config.block_size
    inputs = [torch_tensorrt.Input(min_shape=(1, 1), opt_shape=(1, 64), max_shape=(4, block), dtype=torch.long)]
    trt = torch_tensorrt.compile(gpu, ir="dynamo", inputs=inputs, enabled_precisions={torch.float32})
    run = lambda idx: trt(idx.to("cuda")).float().cpu()  # noqa: E731
    return {"version": torch_tensorrt.__version__, "comparisons": judged(check_forward(model, run))}


def run(shape: str) -> dict:
    report: dict = {"shape": shape, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if not torch.cuda.is_available():
        return report | {"skipped": "TensorRT needs a CUDA device"}
    model = random_model(shape)
    for name, route in (("onnxruntime-tensorrt", onnxruntime_trt), ("torch_tensorrt", torch_tensorrt_route)):
        try:
            report[name] = route(model)
        except Exception as err:  # a route that is installed but cannot build or run: its row says why
            log.exception("%s failed", name)
            report[name] = {"error": f"{type(err).__name__}: {err}"}
    return report


def failed(report: dict) -> bool:
    routes = [r for k, r in report.items() if isinstance(r, dict)]
    return any("error" in r or not all(c["ok"] for c in r.get("comparisons", [])) for r in routes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-124M", choices=SHAPE_CHOICES)
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(args.shape)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 1 if failed(report) else 0


if __name__ == "__main__":
    raise SystemExit(main())
