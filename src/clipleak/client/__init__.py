"""The client side: private images, batches drawn from them, and what the client shares.

Attack, recovery, prior and engine code never imports this package (an import-linter contract checks
it); the API, the evaluator and (later) the federated client do.
"""

from .private import load_private, sample_batch
from .share import share

__all__ = ["load_private", "sample_batch", "share"]
