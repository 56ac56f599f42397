"""Draft-length policies (how many tokens a chain drafter proposes each step)."""

from spec_jax.policies.length import (
    POLICIES,
    EntropyStop,
    FixedLength,
    Heuristic,
    LengthPolicy,
    ThompsonLength,
    make_policy,
)

__all__ = ["POLICIES", "EntropyStop", "FixedLength", "Heuristic", "LengthPolicy", "ThompsonLength", "make_policy"]
