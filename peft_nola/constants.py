"""File names and key prefixes of saved adapters, in one place (peft's own names where peft has them)."""

from peft.utils.constants import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

#: The weights file of a saved adapter (``adapter_model.safetensors``).
WEIGHTS_NAME = SAFETENSORS_WEIGHTS_NAME
#: Weights files in pickle formats, refused unopened.
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
#: The prefix of every tensor key in a saved adapter file: ``base_model.model.<module key>.<parameter>``.
KEY_PREFIX = "base_model.model."

__all__ = ["CONFIG_NAME", "KEY_PREFIX", "PICKLE_NAMES", "WEIGHTS_NAME"]
