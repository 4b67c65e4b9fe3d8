"""Command line: inspect, convert and sample from any supported checkpoint.

    python -m model info CHECKPOINT [--json]
    python -m model convert SRC DST [--dtype auto] [--quantize int8] [--force]
    python -m model generate --checkpoint CKPT --prompt "ROMEO:" [--max-length 200 --temperature 0.8 ...]
    python -m model fetch URI DEST [--sha256 HEX]     (model/fetch/cli.py)
    python -m model build-kernels DIR     (an image's build stage: DIR is then NANOGPT_CPU_KERNELS_DIR)
    python -m model export CKPT --format torchscript|onnx [--dtype float32] OUT

CHECKPOINT may be a path or a https://, s3:// or hf:// URI (docs/checkpoints.md).

Logs go to stderr; only the command's output goes to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .checkpoint import CheckpointError, load_model_from_checkpoint
from .fetch import FetchError
from .fetch import cli as fetch_cli
from .tokenizer import TokenizerError

logger = logging.getLogger("model")


def cmd_info(args) -> int:
    model = load_model_from_checkpoint(args.checkpoint, device="cpu", dtype="auto", tokenizer_path=args.tokenizer)
    info, tok = model.checkpoint_info, model.tokenizer
    report = {
        "path": info.path, "name": info.name, "format": info.format,
        "config": dataclasses.asdict(model.config),
        "parameters": info.n_params, "bytes": info.n_bytes,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "quantization": getattr(model, "quantization", None),
        "tokenizer": {"name": tok.name, "n_vocab": tok.n_vocab, "eot_id": tok.eot_id},
        "digest": info.digest, "source": info.source,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    cfg = ", ".join(f"{k}={v}" for k, v in report["config"].items())
    print(f"path        {info.path}\nname        {info.name}\nformat      {info.format}\nconfig      {cfg}")
    print(f"parameters  {info.n_params:,} ({info.n_params / 1e6:.2f}M)")
    weights = f"int8 weights, {report['dtype']} activations" if report["quantization"] else report["dtype"]
    print(f"bytes       {info.n_bytes:,} ({info.n_bytes / 2**20:.1f} MiB, {weights})")
    print(f"tokenizer   {tok.name} (n_vocab {tok.n_vocab}, eot_id {tok.eot_id})")
    print(f"digest      sha256:{info.digest}")
    print(f"source      {json.dumps(info.source)}")
    return 0


def cmd_convert(args) -> int:
    from .export import save_export

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()) and not args.force:
        logger.error("%s exists and is not empty (use --force to overwrite)", dst)
        return 2
    model = load_model_from_checkpoint(args.src, device="cpu", dtype=args.dtype, tokenizer_path=args.tokenizer,
                                       quantize=args.quantize)
    info = model.checkpoint_info
    # Provenance: where the weights came from, so an export can be traced to its training run.
    # Re-converting an export keeps the original provenance (its keys win).
    source = {"format": info.format, "path": str(Path(info.path).resolve()), "digest": info.digest,
              "name": info.name, **info.source}
    save_export(model, dst, model.tokenizer.spec(), source=source)
    logger.info("wrote %s (%s -> export, %s parameters)", dst, info.format, f"{info.n_params:,}")
    print(dst)
    return 0


def cmd_generate(args) -> int:
    from .generate import generate_text  # imported here: `info` and `convert` need no sampling code

    model = load_model_from_checkpoint(args.checkpoint, device=args.device, dtype=args.dtype,
                                       tokenizer_path=args.tokenizer, quantize=args.quantize)
    for _ in range(args.num_samples):
        print(generate_text(model, args.prompt, max_length=args.max_length, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed))
        if args.num_samples > 1:
            print("---------------")
    return 0


def cmd_build_kernels(args) -> int:
    from .kernels import cpu as cpukernels

    try:
        built = cpukernels.build(Path(args.directory))
    except cpukernels.KernelUnavailable as err:
        logger.error("%s", err)
        return 1
    print(built)
    return 0


def cmd_export(args) -> int:
    from .interop import ExportError, export_model  # imported here: only export needs onnx/jit

    model = load_model_from_checkpoint(args.checkpoint, device="cpu", dtype=args.dtype,
                                       tokenizer_path=args.tokenizer)
    info = model.checkpoint_info
    source = {"format": info.format, "path": str(Path(info.path).resolve()), "digest": info.digest,
              "name": info.name, **info.source}
    try:
        comparisons = export_model(model, args.format, args.out, source=source, overwrite=args.force)
    except ExportError as err:
        logger.error("export failed, nothing written to %s: %s", args.out, err)
        return 1
    print(f"{args.format} export of {info.path} verified against the eager model "
          "(relative = max|diff| / max|logit|):")
    for c in comparisons:
        print(f"  {c}")
    print(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n")[0])
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="format, config, parameters, bytes, tokenizer and digest of a checkpoint")
    info.add_argument("checkpoint")
    info.add_argument("--tokenizer", help="meta.pkl (char models) or a GPT-2 .tiktoken ranks file")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    conv = sub.add_parser("convert", help="write any checkpoint as our export (safetensors + config.json)")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--tokenizer", help="meta.pkl (char models) or a GPT-2 .tiktoken ranks file")
    conv.add_argument("--dtype", default="auto", help="auto (as stored), float32, bfloat16 or float16")
    conv.add_argument("--quantize", choices=("int8",), help="store int8 weights with per-output-channel scales")
    conv.add_argument("--force", action="store_true", help="write into a non-empty DST")
    conv.set_defaults(func=cmd_convert)

    gen = sub.add_parser("generate", help="sample text, like nanoGPT's sample.py")
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--prompt", default="\n")
    gen.add_argument("--max-length", type=int, default=200, help="new tokens per sample")
    gen.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=50, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    gen.add_argument("--dtype", help="float32, bfloat16, float16 (default: by device)")
    gen.add_argument("--tokenizer", help="meta.pkl (char models) or a GPT-2 .tiktoken ranks file")
    gen.add_argument("--quantize", choices=("int8",), help="int8 weights (quantized on load)")
    gen.set_defaults(func=cmd_generate)

    fetch_cli.add_parser(sub)
    kern = sub.add_parser("build-kernels", help="compile the CPU kernels into DIR, for NANOGPT_CPU_KERNELS_DIR")
    kern.add_argument("directory")
    kern.set_defaults(func=cmd_build_kernels)
    exp = sub.add_parser("export", help="write a verified TorchScript file or ONNX directory")
    exp.add_argument("checkpoint")
    exp.add_argument("out", help="a .pt file (torchscript) or a directory (onnx)")
    exp.add_argument("--format", required=True, choices=("torchscript", "onnx"))
    exp.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (torchscript only)")
    exp.add_argument("--tokenizer", help="meta.pkl (char models) or a GPT-2 .tiktoken ranks file")
    exp.add_argument("--force", action="store_true", help="overwrite OUT")
    exp.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FetchError as err:
        logger.error("%s", err)
        return err.exit_code
    except (CheckpointError, TokenizerError, ValueError) as err:
        logger.error("%s", err)  # a typed, explained failure: no traceback
        return 1


if __name__ == "__main__":
    sys.exit(main())
