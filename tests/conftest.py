"""Process-wide test environment, set at import time (before any test imports tiktoken or transformers).

tiktoken reads TIKTOKEN_CACHE_DIR when an encoding is first loaded and then keeps it for the
process, so it must be set before the first get_encoding. The data lives in ../shared beside
the clone (the product itself never looks there).
"""

import os
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
TIKTOKEN_CACHE = SHARED / "tokenizers" / "tiktoken-cache"

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE.resolve()))
# transformers is only an independent reference in tests: never reach the network, stay quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Without a GPU, Triton kernels (model/kernels/triton_*.py) run in Triton's interpreter on CPU tensors.
# triton reads the flag as it is imported (torch._dynamo imports it too), so it is set before any test
# module. bench/gpu_check.sh runs the same tests compiled.
if not Path("/dev/nvidiactl").exists() and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
