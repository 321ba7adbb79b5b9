"""The Upgrader inference service: FastAPI app over the model store, with dynamic batching."""

from service.app import create_app
from service.settings import Settings

__all__ = ["Settings", "create_app"]
