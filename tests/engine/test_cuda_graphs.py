"""The CUDA graphs' buckets (model/engine/cuda_graphs.py): which captured graph a step replays.
Capturing itself needs CUDA: tests/engine/test_engine_cuda.py."""

from __future__ import annotations

from model.engine.cuda_graphs import DecodeGraphs, chunk_buckets, kv_buckets


def test_kv_buckets_halve_the_block():
    assert kv_buckets(1024) == [128, 256, 512, 1024]
    assert kv_buckets(64) == [8, 16, 32, 64]
    assert kv_buckets(2) == [1, 2]


def test_prompt_chunks_replay_the_smallest_captured_prefill_that_holds_them():
    assert chunk_buckets(128, 1024) == [16, 32, 64, 128]
    assert chunk_buckets(100, 1024) == [16, 32, 64, 100]
    assert chunk_buckets(128, 64) == [16, 32, 64]
    graphs = DecodeGraphs()  # the choice alone (capturing needs CUDA)
    graphs.block_size, graphs.lengths, graphs.chunks = 64, kv_buckets(64), chunk_buckets(128, 64)
    assert graphs.prefill_shape(10, 0) == (16, 16)
    assert graphs.prefill_shape(17, 5) == (32, 64)  # positions 5..36 need the 64-long cache
    assert graphs.prefill_shape(16, 48) == (16, 64)  # padding ends exactly at the block's end
    assert graphs.prefill_shape(10, 50) is None  # padded to 16 it would pass the block's end
    assert graphs.prefill_shape(65, 0) is None  # longer than any bucket: eager
