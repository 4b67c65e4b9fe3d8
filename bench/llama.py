"""llama.cpp, through llama-cpp-python, on the benchmark's own random GPT-2 weights: the CPU peer
a user would pick instead of this server.

The weights go out as a Hugging Face GPT-2 directory (config.json, model.safetensors and GPT-2's
vocab.json/merges.txt, which the converter reads to build the GGUF vocabulary), through llama.cpp's
convert_hf_to_gguf.py into GGUF files in f32, f16 and q8_0, and are loaded with llama_cpp.Llama
using torch's thread count. Batch-1 decode is timed as ours is (measure.engine_decode_tok_s):
greedy, the tokens after the first over the time after the first one arrived (prefill excluded),
the median of the repeats after a warm-up, each GGUF file in a process of its own.

Setup (not part of `dev`: building llama.cpp takes minutes, too slow for CI):

    pip install '.[bench-llama]'      # llama-cpp-python, built from PyPI's source package, and gguf

The converter is not installed with the wheel; it ships in the source package
(vendor/llama.cpp/convert_hf_to_gguf.py, with its own gguf-py and conversion/ beside it). Pass
its path with --llama-convert, or let the benchmark fetch the source package of the installed
llama-cpp-python version with pip and unpack it under ~/.cache/nanogpt-bench/.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "q8_0")
OURS_AT = {"f32": "float32", "f16": "float16"}  # our batch-1 row at the same precision
# A build for the CPU it runs on (GGML_NATIVE, the default) enables ggml's AMX backend on Sapphire
# Rapids and later Xeons; q8_0 is among the types it repacks, and segfaults in its matrix product
# have been reported there that other machines do not show (ggml-org/llama.cpp issue 20824). The
# earlier q8_0 crash was on such a Xeon; it has not been reproduced on one since (this bench's hosts
# since had no AMX), so this is the likely cause and the way round, not a confirmed one.
AMX_HINT = ("this CPU has AMX: rebuild without ggml's AMX backend, CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON "
            "-DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF' pip install "
            "--force-reinstall --no-binary llama-cpp-python llama-cpp-python")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanogpt-bench"


def default_tokenizer_dir() -> Path | None:
    """GPT-2's Hugging Face tokenizer files beside the repo (this machine's and CI's offline copy)."""
    shared = (Path(__file__).resolve().parents[1] / ".." / "shared" / "tokenizers").resolve()
    return shared if (shared / "vocab.json").is_file() else None


def _version() -> str:
    from importlib.metadata import version
    return version("llama-cpp-python")


def find_converter(path: str | None) -> Path:
    """convert_hf_to_gguf.py: the given path, or the unpacked source package of the installed version
    (downloaded with pip into the cache on first use). Raises RuntimeError saying why not."""
    if path:
        p = Path(path)
        p = p / "convert_hf_to_gguf.py" if p.is_dir() else p
        if not p.is_file():
            raise RuntimeError(f"no converter at {p}")
        return p
    ver = _version()
    root = CACHE / f"llama_cpp_python-{ver}"
    conv = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if conv.is_file():
        return conv
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        log.info("fetching llama-cpp-python %s's source package for its GGUF converter", ver)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={ver}", "-d", tmp], capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode or not sdists:
            raise RuntimeError(f"pip download of llama-cpp-python=={ver} failed: {done.stderr.strip()[-300:]}")
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name and
                       any(part in m.name for part in ("/convert_hf_to_gguf.py", "/gguf-py/", "/conversion/"))]
            try:
                tar.extractall(tmp, members=members, filter="data")
            except TypeError:  # Python without extraction filters (before 3.10.12 / 3.11.4)
                tar.extractall(tmp, members=members)
        shutil.move(str(Path(tmp) / f"llama_cpp_python-{ver}"), str(root))
    if not conv.is_file():
        raise RuntimeError(f"llama-cpp-python {ver}'s source package has no vendor/llama.cpp/convert_hf_to_gguf.py")
    return conv


def export_hf(hf, tokenizer_dir: Path, out: Path) -> None:
    """`hf` (a GPT2LMHeadModel) as a Hugging Face GPT-2 directory, float32, on the CPU."""
    import torch  # here, not at the top: the worker process (`python -m bench.llama`) needs no torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = hf.config.to_dict()
    config.update(architectures=["GPT2LMHeadModel"], n_ctx=config.get("n_positions", 1024), torch_dtype="float32")
    config.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    # lm_head.weight is tied to wte (GPT-2 checkpoints leave it out; the converter reuses token_embd)
    sd = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in hf.state_dict().items()
          if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, out / name)


def convert(converter: Path, hf_dir: Path, outtype: str, out: Path) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(converter), str(hf_dir), "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True, env=env)
    if done.returncode or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {' | '.join(tail)}")


def decode_tok_s(llm, prompt: list[int], new_tokens: int, repeats: int) -> tuple[float, list[int]]:
    """Greedy batch-1 decode: (tokens after the first) / (time after the first), median of `repeats`
    after a warm-up; and the greedy tokens. End-of-text is not a stop here (generate() never stops
    by itself), so every run produces exactly `new_tokens`."""
    def once(n: int) -> tuple[float, list[int]]:
        llm.reset()
        out: list[int] = []
        t_first = 0.0
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == 1:
                t_first = time.perf_counter()
            if len(out) == n:
                break
        return (n - 1) / max(time.perf_counter() - t_first, 1e-9), out

    once(2)  # warm-up
    rates, tokens = zip(*(once(new_tokens) for _ in range(repeats)))
    return statistics.median(rates), list(tokens[0])  # as ours and transformers' are taken


def bench(hf, prompt: list[int], new_tokens: int, repeats: int, *, threads: int, converter: str | None,
          tokenizer_dir: str | None, reference_tokens: list[int] | None, workdir: str | None = None,
          keep: dict | None = None, outtypes: tuple[str, ...] = OUTTYPES) -> dict:
    """{"rows": {outtype: {...}}, "skipped": {outtype: why}} or {"skipped": why} for the whole peer.
    keep: {outtype: None} for files whose loaded Worker the caller wants back (to measure it again,
    interleaved with other rows), filled in with the Worker; the caller closes it."""
    try:
        import llama_cpp
    except ImportError as err:
        return {"skipped": f"llama-cpp-python is not importable ({err}); pip install '.[bench-llama]'"}
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir()
    if tok_dir is None or not all((tok_dir / f).is_file() for f in ("vocab.json", "merges.txt")):
        return {"skipped": f"GPT-2 vocab.json/merges.txt not found (--hf-tokenizer-dir, got {tok_dir})"}
    try:
        conv = find_converter(converter)
    except Exception as err:
        return {"skipped": f"no GGUF converter: {err}"}
    system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    result: dict = {"version": _version(), "converter": str(conv), "threads": threads, "system_info": system_info,
                    "rows": {}, "skipped": {}}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-", dir=workdir) as tmp:
        hf_dir = Path(tmp) / "hf"
        export_hf(hf, tok_dir, hf_dir)
        for outtype in outtypes:
            gguf = Path(tmp) / f"gpt2-{outtype}.gguf"
            try:
                t0 = time.perf_counter()
                convert(conv, hf_dir, outtype, gguf)
                gguf_bytes = gguf.stat().st_size
                log.info("llama.cpp: converted to %s in %.0fs (%.0f MB)", outtype, time.perf_counter() - t0,
                         gguf_bytes / 1e6)
            except Exception as err:
                result["skipped"][outtype] = f"{type(err).__name__}: {err}"
                log.warning("llama.cpp %s skipped: %s", outtype, err)
                continue
            # in a process of its own: a llama.cpp build that crashes on this CPU (seen: q8_0,
            # SIGSEGV on an AVX-512/AMX Xeon; see AMX_HINT) costs its row, not the whole benchmark
            worker = None
            try:
                worker = Worker(gguf, threads, n_ctx=max(256, len(prompt) + new_tokens + 8),
                                n_batch=max(64, len(prompt)))
                run = worker.measure(prompt, new_tokens, repeats)
            except Crashed as err:
                if worker is not None:
                    worker.close()
                gguf.unlink()
                hint = f"; {AMX_HINT}" if "AMX_INT8 = 1" in system_info else ""
                result["skipped"][outtype] = f"{err}{hint}"
                log.warning("llama.cpp %s: %s", outtype, result["skipped"][outtype])
                continue
            if keep is not None and outtype in keep:
                keep[outtype] = worker  # the caller measures it again and closes it
            else:
                worker.close()
            gguf.unlink()  # a kept worker has it mapped already
            rate, tokens = run["tok_s"], run["tokens"]
            n = min(32, len(tokens))
            ref = None if reference_tokens is None else reference_tokens[:n]
            agree = None if ref is None else next(
                (i for i, (a, b) in enumerate(zip(tokens[:n], ref)) if a != b), min(n, len(ref)))
            result["rows"][outtype] = {"tok_s": rate, "gguf_bytes": gguf_bytes,
                                       "greedy_agrees_with_fp32_for": agree, "compared_tokens": n}
            log.info("llama.cpp %s: %.1f tok/s", outtype, rate)
    return result


class Crashed(RuntimeError):
    """The worker process died (or answered nothing): its exit status and the last lines it wrote."""


def last_words(stderr: str) -> str:
    """What a dead worker said: the first Python exception line (`ValueError: ...`; a later one is
    often an `Exception ignored in __del__` of the half-built object), else its last two lines."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b[^ ]*: ", line)]
    return errors[0] if errors else " | ".join(lines[-2:])


class Worker:
    """One GGUF file loaded by llama.cpp in a process of its own (`python -m bench.llama`), measured
    on request: Worker.measure sends one job a line and reads one result a line, so the file is loaded
    once and can be timed in rounds alternating with other rows. The file may be deleted once the
    worker has loaded it (llama.cpp maps it; the mapping outlives the name)."""

    def __init__(self, model_path: Path, threads: int, n_ctx: int, n_batch: int):
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: nothing blocks on it
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.llama"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
        self._send({"model_path": str(model_path), "threads": threads, "n_ctx": n_ctx, "n_batch": n_batch})
        try:
            self._read()  # {"loaded": true}, or Crashed
        except Crashed:
            self.stderr.close()
            raise

    def measure(self, prompt: list[int], new_tokens: int, repeats: int) -> dict:
        """{"tok_s", "tokens"}: decode_tok_s in the worker."""
        self._send({"prompt": prompt, "new_tokens": new_tokens, "repeats": repeats})
        return self._read()

    def _send(self, job: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: _read says how

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if line:
            return json.loads(line)
        code = self.proc.wait()
        why = f"signal {-code}" if code < 0 else f"exit {code}"
        self.stderr.seek(0)
        tail = last_words(self.stderr.read())
        raise Crashed(f"llama.cpp crashed ({why}){': ' + tail if tail else ''}")

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()  # end of jobs: the worker exits
        self.proc.wait()
        self.stderr.close()


def serve_jobs(lines, out) -> None:
    """The worker's side: the first line loads the model, each later one is a measure job."""
    import llama_cpp

    load = json.loads(next(lines))
    llm = llama_cpp.Llama(model_path=load["model_path"], n_ctx=load["n_ctx"], n_batch=load["n_batch"],
                          n_threads=load["threads"], n_threads_batch=load["threads"], verbose=False)
    out.write(json.dumps({"loaded": True}) + "\n")
    out.flush()
    for line in lines:
        job = json.loads(line)
        rate, tokens = decode_tok_s(llm, job["prompt"], job["new_tokens"], job["repeats"])
        out.write(json.dumps({"tok_s": rate, "tokens": tokens}) + "\n")
        out.flush()


if __name__ == "__main__":
    serve_jobs(iter(sys.stdin), sys.stdout)
