"""portaserve: an LLM serving engine on a platform-neutral core."""
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import portaserve` stays cheap (no torch / transformers import).
    if name == "Engine":
        from portaserve.engine import Engine

        return Engine
    if name == "ServerArgs":
        from portaserve.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(name)


__all__ = ["Engine", "ServerArgs", "__version__"]
