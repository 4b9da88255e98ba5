from .config import NolaConfig
from .layer import NolaLayer
from .model import NolaModel

__all__ = ["NolaConfig", "NolaLayer", "NolaModel"]
