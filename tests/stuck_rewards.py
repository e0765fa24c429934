"""A reward that never returns, named in a pipeline as `grpo:tests.stuck_rewards:never_returns`: what a
hung scoring service looks like to a GRPO stage (tests/test_e2e_reliability.py gives it a time budget)."""

import time


def never_returns(ctx):
    while True:
        time.sleep(60)
