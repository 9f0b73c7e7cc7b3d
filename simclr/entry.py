"""The shell of a script that reads a trained run (neighbors.py, embed.py): parse, require the weights, run.

Only the flag tables and the command-line shell are imported here; the job module, which imports
torch, is imported once the flags are valid.
"""
from __future__ import annotations

import importlib

from .cli import UserError, run_cli
from .flags import build_parser


def run_on_model(argv: list[str] | None, flags, description: str, job: str, oom_advice: str) -> int:
    """Parse `flags` from `argv`, refuse a missing --model_path, then return simclr.JOB's run(args) as the exit
    code, all inside run_cli (one line and exit 2 for a user's mistake)."""
    def go() -> int:
        args = build_parser(flags, description).parse_args(argv)
        if args.model_path is None:
            raise UserError("--model_path is required: pass results/NAME_model.pth written by main.py")
        return importlib.import_module(f"simclr.{job}").run(args)

    return run_cli(go, oom_advice)
