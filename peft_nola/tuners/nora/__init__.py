from .config import NoraConfig
from .layer import NoraLayer
from .model import NoraModel

__all__ = ["NoraConfig", "NoraLayer", "NoraModel"]
