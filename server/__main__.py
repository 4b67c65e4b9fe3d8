"""`python -m server` / `nanogpt-serve`: parse settings, build the app, run it."""

from __future__ import annotations

import asyncio
import logging
import sys

from .config import ConfigError, load_config, log_config
from .logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        logging.getLogger("server").error("configuration error: %s", e, extra={"variable": e.variable})
        return 2
    setup_logging(config.log_level)
    log_config(config)
    from .app import serve  # imports torch: after the settings are known to be valid

    return asyncio.run(serve(config))


if __name__ == "__main__":
    sys.exit(main())
