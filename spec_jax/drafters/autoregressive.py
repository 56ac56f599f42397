"""`ar`: plain autoregressive decoding, the baseline every method is measured against.

The base `Drafter` proposes an empty tree, so each engine step verifies only the pending token and
commits exactly one token: the same jitted step and on-device loop as every speculative method.
"""

from spec_jax.drafters.base import Drafter
from spec_jax.drafters.registry import Built, register


@register("ar", "autoregressive decoding: one target forward per token (the baseline)")
def build(opts, target) -> Built:
    return Built(Drafter())
