"""The benchmark (python -m bench.run). Importing model first sets its OpenMP default before torch loads."""

import model  # noqa: F401
