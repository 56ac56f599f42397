"""Decoding: verification rules, the jitted draft-then-verify engine, and the host-side API."""

from spec_jax.decoding.engine import DecodeState, Engine
from spec_jax.decoding.generate import Generation, generate
from spec_jax.decoding.verify import VerifyResult, verify

__all__ = ["DecodeState", "Engine", "Generation", "VerifyResult", "generate", "verify"]
