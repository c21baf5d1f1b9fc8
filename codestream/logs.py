"""structlog set-up: readable in a terminal, JSON lines elsewhere (CODESTREAM_LOG_FORMAT=json|console)."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(component: str = "") -> None:
    fmt = os.environ.get("CODESTREAM_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    level = getattr(logging, os.environ.get("CODESTREAM_LOG_LEVEL", "INFO").upper(), logging.INFO)
    renderer = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if component:
        processors.append(lambda _logger, _name, event: {"component": component, **event})
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
