"""The autoregressive baseline's stand-in for a forward process.

The causal family corrupts nothing: it predicts x0 left to right, position l from x0^{<l}
after a BOS token. Its components (registered for the "causal" key) receive this object
where a diffusion family's components receive their process, so every sampler and objective
is called the same way. It is not in ``PROCESSES``: there is no corruption to hold to the
process contract.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Causal:
    bos_id: int  # the token the first position is predicted from (dlm uses end-of-text)
