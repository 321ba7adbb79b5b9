"""The Upgrader inference service: FastAPI app over the model store, with dynamic batching."""

from service.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    # create_app is imported on first use: `python -m service` imports this package first, and the
    # worker supervisor must not pull in torch through the app (see service.workers).
    if name == "create_app":
        from service.app import create_app

        return create_app
    raise AttributeError(f"module 'service' has no attribute {name!r}")
