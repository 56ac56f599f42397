"""Figures of a decoding run that every layer reports the same way (pure Python: the benchmark's
PyTorch peers import it without JAX)."""


def tau(new_tokens: int, target_forwards: int, sequences: int = 1) -> float:
    """Tokens committed per target forward in the decode phase, bonus token counted (AR = 1.0).

    Prefill makes one forward and one token per sequence; both are left out.
    """
    steps = target_forwards - sequences
    return (new_tokens - sequences) / steps if steps > 0 else 1.0
