"""Reading foreign weight formats into the JAX model, without torch.

`unpickler` reads `torch.save` files with a restricted unpickler over numpy, `mapping` holds the
key and layout rules between original PyTorch state dicts and the JAX parameter tree, `importer`
turns any supported file into a model. `convert_weights` (the CLI and parity layer) builds on
these; nothing here imports it.
"""


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the model (the message names file/key)."""


class ForbiddenGlobalError(CheckpointError):
    """A pickle references a global outside the allow-list (nothing from it is executed)."""
