"""Keeps our own progress lines readable: drops the INFO chatter of Orbax, TensorStore and etils."""

import logging

_NOISY = ("/orbax/", "/tensorstore/", "/etils/")


class QuietLibraries(logging.Filter):
    """A `logging.Filter` passing WARNING and above from everyone, INFO only from other code."""

    def filter(self, record):
        return record.levelno >= logging.WARNING or not any(s in record.pathname for s in _NOISY)


def install() -> None:
    """Adds `QuietLibraries` to every handler of the root and absl loggers."""
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(QuietLibraries())
