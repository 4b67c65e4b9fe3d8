"""The engine's configuration: one frozen EngineConfig, validated once (ValueError naming the field)."""

from __future__ import annotations

from dataclasses import dataclass

CPU_LINEAR_CHOICES = ("auto", "kernel", "out_in", "in_out")  # see model/engine/cpu_setup.choose_cpu_linear
CPU_ATTENTION_CHOICES = ("auto", "kernel", "torch")  # see model/engine/cpu_setup.choose_cpu_attention
CUDA_KERNELS_CHOICES = ("auto", "triton", "torch")  # see model/engine/cuda_setup.choose_cuda_kernels


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32  # cache rows = sequences decoded together
    max_queue: int = 256  # waiting requests beyond this are rejected with Overloaded
    prefill_chunk: int = 128  # prompt tokens prefilled per step, so a long prompt cannot stall decode
    # ... while some row is decoding (times the rows waiting on their prompts per decoding row,
    # when they outnumber it). With none decoding there is nobody to stall, and a burst of
    # prompts prefills in a few big forwards of up to this many tokens instead of many small ones.
    idle_prefill_chunk: int = 2048
    cuda_graphs: bool = True  # capture the decode step per batch bucket (CUDA only)
    threads: int | None = None  # torch intra-op threads (None: leave torch's default)
    seed: int | None = None  # seeds the engine's RNG that gives unseeded requests their seed
    # What runs nn.Linear on CPU: "kernel" (model/kernels/cpu.py), torch's F.linear on
    # "out_in" (nn.Linear's) or "in_out" weights, or "auto": time them at start.
    cpu_linear: str = "auto"
    # What runs one-token attention on CPU: "kernel" (fused, model/kernels/cpu.py), "torch",
    # or "auto" (the kernel where it builds).
    cpu_attention: str = "auto"
    # Batch-invariant mode (CPU): every matrix product and every attention, prompt chunks
    # included, runs on model/kernels/cpu.py's kernels, which compute each token in one order
    # whatever else is in the step, so a request's logits have the same bits alone, in any
    # batch and under any chunking. Off: that holds for decode batches up to the kernel's
    # measured row limit; prefill goes to torch's faster GEMMs (AMX in half precision).
    batch_invariant: bool = False
    batch_buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32)  # CUDA-graph batch sizes
    # What runs the decode step on CUDA: "triton" (model/kernels/triton_decode.py: five
    # launches a block, attention over each row's own length, so one graph per batch size),
    # "torch" (torch's operators, graphs per batch size and cache length), or "auto" (triton
    # where it imports). Ignored off CUDA.
    # torch until bench/gpu_check.sh has run the Triton path on a GPU (its kernels are checked only under
    # Triton's interpreter so far); then auto (triton where it imports).
    cuda_kernels: str = "torch"
    # Launch each step before reading the tokens of the one before (model/engine/core.py), so that
    # the device does not wait on the host between steps; an eos or stop string then takes effect
    # one step late (the extra token is dropped, never streamed). Off until bench/gpu_check.sh has
    # measured it on a GPU; on a CPU the "device" is the same thread and nothing overlaps.
    async_scheduling: bool = False

    def validate(self) -> "EngineConfig":
        for name in ("max_batch", "max_queue", "prefill_chunk", "idle_prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.cpu_linear not in CPU_LINEAR_CHOICES:
            raise ValueError(f"cpu_linear must be one of {', '.join(CPU_LINEAR_CHOICES)}, got {self.cpu_linear!r}")
        if self.cpu_attention not in CPU_ATTENTION_CHOICES:
            raise ValueError(f"cpu_attention must be one of {', '.join(CPU_ATTENTION_CHOICES)}, "
                             f"got {self.cpu_attention!r}")
        if self.cuda_kernels not in CUDA_KERNELS_CHOICES:
            raise ValueError(f"cuda_kernels must be one of {', '.join(CUDA_KERNELS_CHOICES)}, "
                             f"got {self.cuda_kernels!r}")
        return self
