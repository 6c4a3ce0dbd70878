"""Import/export of SkipClick weights: released `.pth`, state dicts, DINOv2 hub/timm backbones.

Torch-free: `.pth` files are read by `convert_weights.unpickler` (a restricted unpickler over
numpy); only `torch_reference`, `.pth` export and the parity tools need torch.
"""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model (the message names file/key)."""


class ForbiddenGlobalError(CheckpointError):
    """A pickle references a global outside the allow-list (nothing from it is executed)."""
