"""Device kernels the serving engine (model.engine) installs into a GPT: `cpu` holds the
Python side of the CPU decode kernels, `csrc/` their C++ sources. Imports only torch."""
