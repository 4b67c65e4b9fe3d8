"""Load every GPT-2/nanoGPT checkpoint format people have into one GPT, without running pickled code.

    nanogpt        nanoGPT train.py's ckpt.pt: model, model_args, iter_num, best_val_loss, config
    build-nanogpt  build-nanogpt's log/model_XXXXX.pt: model, config (a pickled GPTConfig), step, val_loss
    huggingface    a GPT-2 directory: config.json + model.safetensors (or its index) | pytorch_model.bin
    export         our own directory (model/export.py): config.json + model.safetensors

Each reader returns a _Checkpoint: a GPTConfig and a state dict already in nanoGPT's names
and layout. One function then checks every key and shape and builds the model, so a
mismatch fails loudly instead of leaving a half-loaded model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import export, quant
from .fetch import resolve_checkpoint
from .gpt import GPT, GPTConfig
from .safe_load import BadArchive, ForeignConfig, UnsafeCheckpoint, safe_torch_load
from .tokenizer import GPT2_N_VOCAB, Tokenizer, TokenizerError, load_gpt2_tokenizer, load_meta_pkl, load_tokenizer_from_spec

logger = logging.getLogger(__name__)

WTE, LM_HEAD = "transformer.wte.weight", "lm_head.weight"
# Causal-mask buffers that old nanoGPT / Hugging Face versions saved with the weights; we rebuild masks.
STALE_SUFFIXES = (".attn.bias", ".attn.masked_bias")
# Wrappers that prefix every key: torch.compile (`_orig_mod.`) and DistributedDataParallel (`module.`).
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Hugging Face's Conv1D stores these as (in, out); nn.Linear wants (out, in).
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
GENERIC_STEMS = ("ckpt", "model", "checkpoint", "pytorch_model")
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


class CheckpointError(Exception):
    """A checkpoint cannot be loaded: names the path, the problem and, when one is at fault, the tensor."""

    def __init__(self, path, problem: str, key: str | None = None, expected=None, got=None):
        super().__init__(str(path), problem, key, expected, got)
        self.path, self.problem, self.key, self.expected, self.got = str(path), problem, key, expected, got

    def __str__(self) -> str:
        msg = f"{self.path}: {self.problem}"
        if self.key is not None:
            msg += f": {self.key}"
        if self.expected is not None or self.got is not None:
            msg += f" (expected {self.expected}, got {self.got})"
        return msg


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    format: str  # "nanogpt" | "build-nanogpt" | "huggingface" | "export"
    digest: str  # sha256 hex of the weights file(s), concatenated in load order
    n_params: int  # the tied embedding counted once
    n_bytes: int  # parameter bytes as loaded (device dtype)
    source: dict  # provenance: step/iter_num, val loss, dataset, original format, ...
    name: str  # short model name, e.g. for /v1/models


@dataclass
class _Checkpoint:
    path: Path
    format: str
    config: GPTConfig
    state: dict[str, torch.Tensor]  # nanoGPT names and layouts
    source: dict
    weight_files: list[Path]
    tokenizer_spec: dict | None = None  # only our export records one
    quantization: str | None = None  # "int8": an int8 export (model/quant.py)
    meta_dirs: list[Path] = field(default_factory=list)  # where a char model's meta.pkl may be


# --- reading each format -----------------------------------------------------------------


def read_checkpoint(path: str | Path, max_pickle_bytes: int | None = None) -> _Checkpoint:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    # A weights file inside a Hugging Face or export directory means that directory.
    if path.is_file() and path.name in (*HF_WEIGHTS, export.WEIGHTS_FILE) and (path.parent / "config.json").is_file():
        path = path.parent
    if path.is_dir():
        if export.is_export_dir(path):
            return _read_export(path)
        if (path / "config.json").is_file():
            return _read_hf(path)
        raise CheckpointError(path, "unknown format: a directory without config.json "
                                    "(expected a Hugging Face GPT-2 directory or a `python -m model convert` export)")
    obj = _load_pickled(path, max_pickle_bytes)
    if isinstance(obj, dict) and "model" in obj and "model_args" in obj:
        return _read_nanogpt(path, obj)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj.get("config"), (ForeignConfig, dict)):
        return _read_build_nanogpt(path, obj)
    raise CheckpointError(path, f"unknown format: {_describe(obj)}; expected nanoGPT's "
                                "{model, model_args, ...} or build-nanogpt's {model, config, step, ...}")


def _load_pickled(path: Path, max_pickle_bytes: int | None = None):
    with open(path, "rb") as f:
        head = f.read(16)
    is_zip = zipfile.is_zipfile(path)
    if not head:
        raise CheckpointError(path, "not a checkpoint: the file is empty")
    if head[:4] == b"PK\x03\x04" and not is_zip:
        raise CheckpointError(path, "truncated or corrupt: a zip archive without its central directory "
                                    "(an interrupted copy or download?)")
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        raise CheckpointError(path, "a bare safetensors file has no model config; pass the directory that "
                                    "holds it with its config.json")
    if not is_zip and head[0] != 0x80:  # 0x80 = pickle PROTO opcode, how legacy torch.save files begin
        raise CheckpointError(path, "not a checkpoint: neither a PyTorch zip archive nor a pickle")
    if is_zip and not _has_data_pkl(path):
        raise CheckpointError(path, "not a checkpoint: a zip archive without PyTorch's data.pkl")
    try:
        return safe_torch_load(path, max_pickle_bytes=max_pickle_bytes)
    except BadArchive as err:
        raise CheckpointError(path, str(err)) from None
    except UnsafeCheckpoint as err:
        raise CheckpointError(path, f"refused: {err}; loading it could run code (only tensors, plain containers "
                                    "and a GPTConfig are allowed)") from None
    except Exception as err:  # EOFError, RuntimeError from the zip reader, UnpicklingError, ...
        raise CheckpointError(path, f"truncated or corrupt: {_corruption(err)}") from err


def _corruption(err: Exception) -> str:
    """One line on what broke; exceptions with no message (a zip whose records are shorter than
    declared raises a bare EOFError) get one."""
    first = (str(err).strip().splitlines() or [""])[0][:200]
    if first:
        return f"{type(err).__name__}: {first}"
    if isinstance(err, EOFError):
        return "the data ends before what it declares (EOFError): a record is shorter than its header says"
    return f"{type(err).__name__} while reading it"


def _has_data_pkl(path: Path) -> bool:
    with zipfile.ZipFile(path) as zf:
        return any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())


def _read_nanogpt(path: Path, obj: dict) -> _Checkpoint:
    if not isinstance(obj["model_args"], dict):
        raise CheckpointError(path, f"model_args is {type(obj['model_args']).__name__}, expected a dict")
    config = _make_config(path, obj["model_args"], gelu_approximate="none")  # nanoGPT's MLP: exact GELU
    train = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    source = {"format": "nanogpt", "iter_num": _plain(obj.get("iter_num")),
              "best_val_loss": _plain(obj.get("best_val_loss")), "dataset": _plain(train.get("dataset")),
              "train_config": {k: _plain(v) for k, v in train.items() if _plain(v) is not None}}
    # nanoGPT's sample.py finds data/<dataset>/meta.pkl relative to the working directory.
    meta_dirs = [path.parent]
    if isinstance(train.get("dataset"), str):
        meta_dirs += [d / "data" / train["dataset"] for d in (path.parent, path.parent.parent, Path.cwd())]
    return _Checkpoint(path, "nanogpt", config, _strip_keys(path, obj["model"]), source, [path], meta_dirs=meta_dirs)


def _read_build_nanogpt(path: Path, obj: dict) -> _Checkpoint:
    cfg = obj["config"]
    fields = dict(vars(cfg)) if isinstance(cfg, ForeignConfig) else dict(cfg)
    # build-nanogpt's model always has biases and uses GPT-2's tanh GELU.
    config = _make_config(path, {**fields, "bias": True}, gelu_approximate="tanh")
    source = {"format": "build-nanogpt", "step": _plain(obj.get("step")), "val_loss": _plain(obj.get("val_loss"))}
    return _Checkpoint(path, "build-nanogpt", config, _strip_keys(path, obj["model"]), source, [path],
                       meta_dirs=[path.parent])


def _read_hf(path: Path) -> _Checkpoint:
    cfg = _read_json(path / "config.json")
    config = _hf_config(path, cfg)
    files = _hf_weight_files(path)
    state = {}
    for f in files:
        state.update(_read_safetensors(f) if f.suffix == ".safetensors" else _load_pickled(f))
    state = _strip_keys(path, state)
    renamed = {}
    for k, v in state.items():
        k = k.removeprefix("transformer.")  # GPT2LMHeadModel saves with it, GPT2Model (hub "gpt2") without
        if k != LM_HEAD:
            k = "transformer." + k
        renamed[k] = v.t().contiguous() if k.endswith(HF_CONV1D) else v
    source = {"format": "huggingface", "model_type": cfg.get("model_type"), "name_or_path": cfg.get("_name_or_path")}
    return _Checkpoint(path, "huggingface", config, renamed, source, files, meta_dirs=[path])


def _hf_config(path: Path, cfg: dict) -> GPTConfig:
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(path, f"unknown format: config.json model_type {cfg.get('model_type')!r} is not 'gpt2'")
    act = cfg.get("activation_function", "gelu_new")
    if act not in HF_GELU:
        raise CheckpointError(path, "unsupported activation_function", expected=sorted(HF_GELU), got=act)
    # Our LayerNorm uses GPT-2's eps; a different one would silently change every logit.
    if abs(cfg.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise CheckpointError(path, "unsupported layer_norm_epsilon", expected=1e-5, got=cfg["layer_norm_epsilon"])
    n_embd = cfg.get("n_embd")
    if cfg.get("n_inner") not in (None, 4 * (n_embd or 0)):
        raise CheckpointError(path, "unsupported n_inner", expected=f"null or 4*n_embd", got=cfg["n_inner"])
    for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                     ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if cfg.get(flag, ok) != ok:
            raise CheckpointError(path, f"unsupported {flag}", expected=ok, got=cfg[flag])
    fields = {"block_size": cfg.get("n_positions", cfg.get("n_ctx")), "vocab_size": cfg.get("vocab_size"),
              "n_layer": cfg.get("n_layer"), "n_head": cfg.get("n_head"), "n_embd": n_embd, "bias": True}
    return _make_config(path, {k: v for k, v in fields.items() if v is not None}, gelu_approximate=HF_GELU[act])


def _hf_weight_files(path: Path) -> list[Path]:
    for name in HF_WEIGHTS:
        f = path / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):  # sharded: {"weight_map": {tensor: shard file}}
            shards = sorted(set(_read_json(f).get("weight_map", {}).values()), key=str)
            _confine_shards(f, shards)
            missing = [s for s in shards if not (path / s).is_file()]
            if not shards or missing:
                raise CheckpointError(f, "sharded index names missing shard files", got=missing or "no shards")
            return [path / s for s in shards]
        return [f]
    raise CheckpointError(path, f"no weights: expected one of {', '.join(HF_WEIGHTS)}")


def _confine_shards(index: Path, shards: list) -> None:
    """A shard must be a plain file name inside the checkpoint's directory: an index naming
    `../secrets` or `/etc/passwd` (or a symlink out) is refused, not read."""
    root = index.parent.resolve()
    for s in shards:
        if not isinstance(s, str) or not s or Path(s).is_absolute() or ".." in Path(s).parts:
            raise CheckpointError(index, "sharded index names a file outside the checkpoint directory", got=s)
        if root not in (root / s).resolve().parents:
            raise CheckpointError(index, "sharded index names a file outside the checkpoint directory "
                                         "(through a symlink)", got=s)


def _read_export(path: Path) -> _Checkpoint:
    try:
        config, spec, source = export.read_export_meta(path)
        quantization = export.read_export_quantization(path)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(path / export.CONFIG_FILE, f"invalid export config: {err}") from err
    weights = path / export.WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(weights, "no such file (an export needs its weights beside config.json)")
    state = _read_safetensors(weights)
    if LM_HEAD in state:  # as export.read_export_state: the tied embedding is stored once
        state[WTE] = state[LM_HEAD]
    if quantization is not None and LM_HEAD + "_scale" in state:
        state[export.TIED_SCALE_KEY] = state[LM_HEAD + "_scale"]
    return _Checkpoint(path, "export", config, state, dict(source), [weights], tokenizer_spec=spec,
                       meta_dirs=[path], quantization=quantization)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))  # memory-mapped by safetensors; no pickle involved
    except Exception as err:  # SafetensorError for truncated or corrupt headers/data
        raise CheckpointError(path, f"truncated or corrupt safetensors file: {err}") from err


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(path, f"not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(path, "not a JSON object")
    return data


def _make_config(path: Path, fields: dict, gelu_approximate: str) -> GPTConfig:
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    kwargs = {k: v for k, v in fields.items() if k in known}
    kwargs["gelu_approximate"] = gelu_approximate
    missing = sorted({"block_size", "vocab_size", "n_layer", "n_head", "n_embd"} - kwargs.keys())
    if missing:
        raise CheckpointError(path, f"the model config lacks {', '.join(missing)}")
    try:
        return GPTConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(path, f"invalid model config: {err}") from err


def _strip_keys(path: Path, state) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes and stale mask buffers; keys are otherwise nanoGPT's already."""
    if not isinstance(state, dict):
        raise CheckpointError(path, f"'model' is {type(state).__name__}, expected a state dict")
    out = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        if not k.endswith(STALE_SUFFIXES):
            out[k] = v
    return out


def _plain(v):
    """JSON-friendly provenance values: tensors become numbers, other objects are dropped."""
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v if isinstance(v, (int, float, str, bool)) else None


def _describe(obj) -> str:
    if isinstance(obj, dict):
        return f"a dict with keys {sorted(map(str, obj))[:8]}"
    return f"a pickled {type(obj).__name__}"


# --- tokenizer ---------------------------------------------------------------------------


def _tokenizer_for(ckpt: _Checkpoint, tokenizer_path: str | Path | None) -> Tokenizer:
    """Explicit meta.pkl > the export's own spec > meta.pkl beside the checkpoint > GPT-2 BPE."""
    try:
        if tokenizer_path is not None and Path(tokenizer_path).suffix == ".pkl":
            tok = load_meta_pkl(tokenizer_path)
        elif ckpt.tokenizer_spec:
            tok = load_tokenizer_from_spec(ckpt.tokenizer_spec, tokenizer_path)
        elif meta := next((d / "meta.pkl" for d in ckpt.meta_dirs if (d / "meta.pkl").is_file()), None):
            tok = load_meta_pkl(meta)
        elif ckpt.config.vocab_size >= GPT2_N_VOCAB:
            tok = load_gpt2_tokenizer(tokenizer_path)
        else:
            looked = ", ".join(str(d / "meta.pkl") for d in ckpt.meta_dirs)
            raise CheckpointError(ckpt.path, f"no tokenizer: vocab_size {ckpt.config.vocab_size} is not GPT-2's "
                                             f"and no meta.pkl was found (looked at {looked}); pass tokenizer_path")
    except TokenizerError as err:
        raise CheckpointError(ckpt.path, f"tokenizer: {err}") from err
    # A padded model vocabulary (50304 for 50257 tokens) is fine; a larger tokenizer is not.
    if tok.n_vocab > ckpt.config.vocab_size:
        raise CheckpointError(ckpt.path, f"the {tok.name} tokenizer has more tokens than the model's vocab_size",
                              expected=f"<= {ckpt.config.vocab_size}", got=tok.n_vocab)
    return tok


# --- building the model ------------------------------------------------------------------


def _tie_embeddings(path: Path, state: dict) -> None:
    """Fill in whichever of the tied pair a format stores once; refuse genuinely untied weights."""
    wte, head = state.get(WTE), state.get(LM_HEAD)
    if wte is None and head is not None:
        state[WTE] = head
    elif head is None and wte is not None:
        state[LM_HEAD] = wte
    elif wte is not None and wte.data_ptr() != head.data_ptr():
        if wte.shape != head.shape or not torch.equal(wte, head):
            raise CheckpointError(path, "untied output embedding: GPT-2 and nanoGPT tie it to the token embedding",
                                  key=LM_HEAD)


def _check_state(path: Path, state: dict, expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing:
        raise CheckpointError(path, f"missing {len(missing)} tensor(s) the config needs, e.g. "
                                    f"{', '.join(missing[:4])}", key=missing[0])
    if unexpected:
        raise CheckpointError(path, f"{len(unexpected)} unexpected tensor(s) for this config, e.g. "
                                    f"{', '.join(unexpected[:4])}", key=unexpected[0])
    for k, want in expected.items():
        if state[k].shape != want.shape:
            raise CheckpointError(path, "tensor shape does not match the model config", key=k,
                                  expected=tuple(want.shape), got=tuple(state[k].shape))


def _place(state: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Each tensor on device/dtype, in memory we own (tied tensors stay one tensor); int8
    weights stay int8 and their scales float32 (model/quant.py).

    The file stays memory-mapped only while we copy out of it: nanoGPT's train.py rewrites
    ckpt.pt in place, and a served model must not change (or SIGBUS) when that happens."""
    placed: dict[int, torch.Tensor] = {}
    for k, v in state.items():
        if id(v) not in placed:
            keep = not v.is_floating_point() or k.endswith(quant.SCALE_SUFFIX)
            out = v.to(device=device, dtype=v.dtype if keep else dtype)
            placed[id(v)] = out.clone() if out.data_ptr() == v.data_ptr() else out
    return {k: placed[id(v)] for k, v in state.items()}


def build_model(ckpt: _Checkpoint, device: torch.device, dtype: torch.dtype) -> GPT:
    state = dict(ckpt.state)
    if ckpt.quantization is None:
        _tie_embeddings(ckpt.path, state)
    # Built on the meta device (no memory, no random init); the checked tensors are then
    # assigned as the parameters, so the weights are copied exactly once.
    with torch.device("meta"):
        model = GPT(ckpt.config)
        if ckpt.quantization is not None:
            quant.quantize_model(model, ckpt.quantization)  # on meta: only the int8 modules' layout
    expected = model.state_dict()
    _check_state(ckpt.path, state, expected)
    for k, want in expected.items():
        if (state[k].dtype == torch.int8) != (want.dtype == torch.int8):
            raise CheckpointError(ckpt.path, "tensor dtype does not match the quantization", key=k,
                                  expected=str(want.dtype), got=str(state[k].dtype))
    model.load_state_dict(_place(state, device, dtype), strict=True, assign=True)
    if ckpt.quantization is not None:
        model.transformer.wte.dtype = dtype
        quant.tie_quantized(model)
    else:
        model.transformer.wte.weight = model.lm_head.weight  # assign=True replaced both; tie them again
    return model.eval()


def resolve_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype, device: torch.device, stored: torch.dtype) -> torch.dtype:
    """None: float32 on CPU, bfloat16 on CUDA (float16 where bf16 is missing); "auto": as stored."""
    if dtype is None:
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return stored
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[name]


def file_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _short_name(path: Path) -> str:
    if path.is_file() and path.stem in GENERIC_STEMS:  # out-shakespeare-char/ckpt.pt -> out-shakespeare-char
        return path.parent.resolve().name
    return path.stem if path.is_file() else path.resolve().name


def load_model_from_checkpoint(checkpoint_path, device=None, dtype=None, tokenizer_path=None,
                               max_pickle_bytes: int | None = None, quantize: str | None = None) -> GPT:
    """Any supported checkpoint -> GPT in eval mode on `device`/`dtype`, with .tokenizer and .checkpoint_info.

    checkpoint_path: a local path, or a https://, s3:// or hf:// URI (fetched and cached; docs/checkpoints.md).

    tokenizer_path: a char model's meta.pkl, or a GPT-2 `.tiktoken` ranks file (else tiktoken's cache/network).
    dtype: torch.dtype or a name ("float32", "bf16", ...); None picks by device; "auto" keeps the stored dtype.
    max_pickle_bytes: the most a checkpoint's pickle may inflate to (model.safe_load.MAX_PICKLE_BYTES).
    quantize: "int8" quantizes the weights on load (model/quant.py); None keeps them as stored
    (an int8 export stays int8; `dtype` is then its activations', norms' and biases').
    """
    if quantize is not None and quantize not in quant.QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(quant.QUANTIZATIONS)} or None, got {quantize!r}")
    local = resolve_checkpoint(checkpoint_path)  # a URI is fetched into the cache first (model/fetch)
    ckpt = read_checkpoint(local.path, max_pickle_bytes)
    tokenizer = _tokenizer_for(ckpt, tokenizer_path)
    device = resolve_device(device)
    stored = next((v.dtype for v in ckpt.state.values() if v.is_floating_point()), torch.float32)
    dtype = resolve_dtype(dtype, device, stored)
    if quantize is not None and ckpt.quantization is None:
        # quantized from float32 weights, not from weights already rounded to dtype
        model = quant.quantize_model(build_model(ckpt, device, torch.float32), quantize, dtype)
    else:
        model = build_model(ckpt, device, dtype)
    n_bytes = quant.weight_bytes(model)
    model.tokenizer = tokenizer
    model.checkpoint_info = CheckpointInfo(
        path=str(ckpt.path), format=ckpt.format, digest=file_digest(ckpt.weight_files),
        n_params=quant.count_weights(model), n_bytes=n_bytes, source={**ckpt.source, **local.provenance},
        name=local.name or _short_name(ckpt.path))
    logger.info("loaded %s checkpoint %s: %.2fM parameters, %.1f MiB as %s on %s, tokenizer %s",
                ckpt.format, ckpt.path, quant.count_weights(model) / 1e6, n_bytes / 2**20,
                str(dtype).removeprefix("torch."), device, tokenizer.name)
    return model
