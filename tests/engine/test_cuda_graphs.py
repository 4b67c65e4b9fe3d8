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


class Replayed:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_decode_replays_the_smallest_captured_length_and_one_graph_serves_every_length_when_rows_attend_over_their_own():
    graphs = DecodeGraphs()  # the choice alone (capturing needs CUDA)
    by_length = {L: Replayed() for L in kv_buckets(64)}
    graphs.graphs = {(1, L): (g, (f"logits {L}", None)) for L, g in by_length.items()}
    graphs.decode_lengths = kv_buckets(64)  # torch's attention reads the bucket: one graph per length
    assert graphs.replay(1, 9) == ("logits 16", None) and by_length[16].replays == 1
    graphs.graphs = {(1, 64): (by_length[64], ("logits 64", "tokens 64"))}  # the Triton path, its sampler captured
    graphs.decode_lengths = [64]
    assert [graphs.replay(1, n) for n in (1, 33, 64)] == [("logits 64", "tokens 64")] * 3
    assert by_length[64].replays == 3


def test_set_sampling_fills_every_per_row_buffer_the_captured_sampler_reads():
    import torch
    graphs = DecodeGraphs()  # the buffers capture() allocates, on CPU
    graphs._temperature, graphs._top_p = torch.ones(4), torch.ones(4)
    graphs._top_k, graphs._seed = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    graphs.set_sampling(torch.tensor([0.8, 0.0]), torch.tensor([50, 0]), torch.tensor([0.9, 1.0]),
                        torch.tensor([7, 8]))
    assert graphs._temperature.tolist() == [0.800000011920929, 0.0, 1.0, 1.0]
    assert graphs._top_k.tolist() == [50, 0, 0, 0] and graphs._seed.tolist() == [7, 8, 0, 0]
    assert graphs._top_p.tolist() == [torch.tensor(0.9).item(), 1.0, 1.0, 1.0]  # top-p is captured too
