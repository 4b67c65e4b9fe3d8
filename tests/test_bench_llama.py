"""bench/llama.py's worker process: a llama.cpp that dies costs its row with the reason, not the benchmark."""

import pytest

from bench import llama


def test_worker_that_dies_at_load_says_how(tmp_path):
    # no llama_cpp here (ImportError), or a file llama.cpp cannot load (ValueError): either way the
    # worker exits at its first line, and the caller hears Crashed with the exit status and the error
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"not gguf")
    with pytest.raises(llama.Crashed, match=r"llama\.cpp crashed \(exit 1\): \w*(Error|Exception): "):
        llama.Worker(bogus, threads=1, n_ctx=64, n_batch=64)


def test_last_words_prefer_the_exception_to_a_later_destructor_complaint():
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n    raise ValueError(...)\n"
              "ValueError: Failed to load model from file: m.gguf\n"
              "Exception ignored in: <function LlamaModel.__del__>\n    self.close()\n       ^^^^^\n"
              "AttributeError: 'LlamaModel' object has no attribute 'sampler'\n")
    assert llama.last_words(stderr) == "ValueError: Failed to load model from file: m.gguf"
    assert llama.last_words("ggml: illegal instruction\n\n  core dumped\n") == "ggml: illegal instruction | core dumped"
