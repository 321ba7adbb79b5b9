"""GET /: the page for people (plain HTML, JS and CSS in service/static, no build step), and its files under /static."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"

router = APIRouter(tags=["page"])


@router.get("/", summary="The page: try every model on an image, and browse the models", response_class=FileResponse,
            responses={200: {"content": {"text/html": {}}}})
async def index() -> FileResponse:
    # no-cache: the page is small and must never outlive the API it talks to after an upgrade.
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """The page's script, style and bundled example images (mounted at /static by create_app)."""
    return StaticFiles(directory=STATIC_DIR)
