from portaserve.lang.backends.base import Backend
from portaserve.lang.backends.endpoint import RuntimeEndpoint
from portaserve.lang.backends.runtime import Runtime

__all__ = ["Backend", "RuntimeEndpoint", "Runtime"]
