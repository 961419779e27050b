"""What the four commands (wallet-api, wallet-worker, wallet-inspect, wallet-admin) share:
--help and --version from argparse, and their exit statuses in --help's epilog."""

from __future__ import annotations

import argparse
import textwrap
from importlib import metadata

DISTRIBUTION = "wallet-service"


def version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def parser(prog: str, doc: str | None, exit_codes: dict[int, str]) -> argparse.ArgumentParser:
    """A parser for the command `prog`: its description is the module's docstring `doc`, and
    the epilog lists `exit_codes` (2 is argparse's own, for a command line it refuses)."""
    codes = {**exit_codes, 2: "the command line is not valid (usage)"}
    epilog = "exit status:\n" + "\n".join(
        textwrap.fill(why, 88, initial_indent=f"  {code}  ", subsequent_indent="     ")
        for code, why in sorted(codes.items())
    )
    made = argparse.ArgumentParser(
        prog=prog,
        description=doc,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    made.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return made
