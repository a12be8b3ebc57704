"""Command-line options of ``metastone demo`` (kept apart so ``metastone --help`` stays fast)."""

from __future__ import annotations

import argparse


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the CPU end-to-end reproduction; every budget has a default that meets the 10-minute target."""
    parser.add_argument(
        "--output-dir", default="metastone-demo", help="where the checkpoint, table, plot and report go"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output-dir")
    parser.add_argument(
        "--task",
        choices=("short", "long", "verify"),
        default="short",
        help="short: 3 steps, one stale fact (Best-of-N's scaling); long: 7 steps with a 0.3 teacher error at every "
        "step, errors compounding (where beam search and DVTS beat Best-of-N); verify: 4 steps whose wrong ones look "
        "like right ones (the head has to check a step against the prompt); see metastone_hf.demo.task",
    )
    parser.add_argument(
        "--hops",
        type=int,
        default=None,
        metavar="K",
        help="steps per trajectory, 1 to 7 (default: the task's own, 3 short / 7 long)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 2 when two cores are idle, else 1; the results do not depend on it)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny budgets (a CI smoke run: the targets are not expected)"
    )
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT warm-start optimizer steps")
    parser.add_argument("--rl-steps", type=int, default=None, help="joint GRPO + SPR optimizer steps")
    parser.add_argument("--eval-problems", type=int, default=None, help="held-out problems in the final evaluation")
    parser.add_argument("--samples", type=int, default=32, help="candidates per held-out problem (max N)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
