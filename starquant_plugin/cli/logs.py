"""Keep the commands' stdout (tables, paths) readable.

llm-compressor configures loguru on import to print INFO lines to stdout, which buries a
command's table. The commands send loguru to stderr at WARNING (INFO with ``--verbose``, or
whatever ``LLM_COMPRESSOR_LOG_LEVEL`` says), so warnings stay visible and stdout holds only
what the command prints.
"""

from __future__ import annotations

import os
import sys

LOG_FORMAT = "{time:HH:mm:ss} | {level} | {message}"


def route_llmcompressor_logs(verbose: bool = False) -> None:
    """Import llm-compressor (its import configures loguru to stdout and already logs) with
    its logging off, then send loguru to stderr at the chosen level."""
    user_disabled = os.environ.get("LLM_COMPRESSOR_LOG_DISABLED")
    if "llmcompressor" not in sys.modules:
        os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = "true"
        try:
            import llmcompressor  # noqa: F401
        finally:
            if user_disabled is None:
                del os.environ["LLM_COMPRESSOR_LOG_DISABLED"]
            else:
                os.environ["LLM_COMPRESSOR_LOG_DISABLED"] = user_disabled
    from llmcompressor.logger import support_log_once
    from loguru import logger

    if (user_disabled or "").lower() == "true":
        return
    logger.enable("llmcompressor")
    level = os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "INFO" if verbose else "WARNING")
    logger.remove()
    logger.add(sys.stderr, level=level.upper(), format=LOG_FORMAT, filter=support_log_once)


def status(message: str) -> None:
    """A progress line for the user, on stderr beside the progress bars."""
    print(message, file=sys.stderr, flush=True)
