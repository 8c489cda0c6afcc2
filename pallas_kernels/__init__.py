"""Pallas attention kernels over the paged KV cache (imports jax only).

``paged_attention`` has the signature of ``model_zoo.attention.paged_attention_xla`` plus
keyword-only static options (``max_query_len=1`` selects the decode kernel); see
``pallas_kernels/paged_attention.py``. ``paged_attention_reference`` is the pure-jnp ground truth.
"""

from pallas_kernels.paged_attention import paged_attention
from pallas_kernels.reference import paged_attention_reference

__all__ = ["paged_attention", "paged_attention_reference"]
