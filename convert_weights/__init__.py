"""The weight-conversion CLI and the PyTorch parity layer.

`python -m convert_weights` converts files (reading is `skipclick_jax.weights`, torch-free);
`verify` and `dump_stages` compare against `torch_reference` (the original network restated in
PyTorch) and `torch_noc` (the original evaluation loop). Only these and `.pth` export need torch.
"""

from skipclick_jax.weights import CheckpointError, ForbiddenGlobalError

__all__ = ["CheckpointError", "ForbiddenGlobalError"]
