"""Drafters, all behind the contract of `base.py`, one family per file, each registered in `registry.py`."""

from spec_jax.drafters.base import (
    Drafter,
    DraftShape,
    PrefillContext,
    StepContext,
    StepResult,
    TemplateDrafter,
)
from spec_jax.drafters.registry import Built, Method, Option, Target, register

__all__ = ["Built", "DraftShape", "Drafter", "Method", "Option", "PrefillContext", "StepContext", "StepResult",
           "Target", "TemplateDrafter", "register"]
