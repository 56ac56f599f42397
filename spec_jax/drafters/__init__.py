"""Drafters, all behind the `Drafter` interface of `base.py`; one family per file."""

from spec_jax.drafters.base import Drafter, PrefillContext, StepContext, StepResult

__all__ = ["Drafter", "PrefillContext", "StepContext", "StepResult"]
