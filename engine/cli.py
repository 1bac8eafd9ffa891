"""Shared CLI plumbing: one-line errors instead of tracebacks."""
from __future__ import annotations

import sys

from common.errors import FlowlabError


def run_cli(main) -> None:
    """Call ``main()``; a FlowlabError becomes ``error: ...`` on stderr and exit code 2."""
    try:
        main()
    except FlowlabError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
