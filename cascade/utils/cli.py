"""Command-line plumbing shared by the scripts: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

__all__ = ["OneLineParser", "on_off"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``error: …``) and exit code 2, no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def on_off(value: str) -> bool:
    """An ``on`` / ``off`` flag value (also true / false, yes / no, 1 / 0) as a bool; the argparse ``type`` of such flags."""
    words = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}
    if value.lower() not in words:
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return words[value.lower()]
