"""Device kernels the serving engine (model.engine) installs into a GPT: `cpu` holds the
Python side of the CPU decode kernels, `csrc/` their C++ sources; `triton_decode` and
`triton_sampling` the CUDA decode step's and sampler's Triton kernels (their source in
`triton_src`, imported only when first launched). Imports only torch (triton on first use)."""
