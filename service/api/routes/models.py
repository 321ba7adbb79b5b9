"""What is served: GET /models..., the trainer's pictures, and the admin alias endpoint."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import ValidationError

from model_store import StoreError, StoreUnavailable
from service.runtime.priority import off_loop
from service.api.deps import ManagerDep, require_admin
from service.errors import ApiError, validation_message, unavailable
from service.redact import public, scrub_text
from service.runtime import inputs
from service.runtime.upscaler import any_size_model
from service.runtime.registry import ModelManager, ModelState
from service.api.schemas import DEFAULT_DEGRADATION, AliasResponse, AliasUpdate, ErrorResponse, ModelInfo, ModelList, VersionDetail, VersionInfo

router = APIRouter(prefix="/models", tags=["models"],
                   responses={401: {"model": ErrorResponse, "description": "UPGRADER_API_KEYS is set and no valid key was sent."}})

NameParam = Annotated[str, Path(description="Model name as in the store.")]
VersionParam = Annotated[str, Path(description="Version number or alias (latest, stable, ...).")]
ALIAS_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$"  # a store name that cannot be read as a version number
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "Unknown model, version or file."}}


def version_info(state: ModelState, version: int, detail: bool = False) -> VersionInfo:
    manifest = state.manifests.get(version, {})
    if version in state.failed:
        status = "failed"
    elif version == state.serving:
        status = "serving"
    elif version in state.loaded:
        status = "loaded"
    else:
        status = "loading" if version in state.loading else "available"
    # Manifests and refusal reasons are served without host paths (service.redact).
    error = state.failed.get(version)
    fields = dict(
        version=version, status=status, error=None if error is None else scrub_text(error), created_at=manifest.get("created_at"),
        aliases=sorted(alias for alias, v in state.aliases.items() if v == version) + (["latest"] if version == state.serving else []),
        dataset=public(manifest.get("dataset")), recipe=public(manifest.get("recipe")), metrics=manifest.get("metrics"),
        evaluation=manifest.get("evaluation"),
        weights_sha256=manifest.get("weights_sha256"), epochs_completed=manifest.get("epochs_completed"),
    )
    return VersionDetail(**fields, manifest=public(manifest)) if detail else VersionInfo(**fields)


def model_info(manager: ModelManager, state: ModelState) -> ModelInfo:
    newest = public(state.manifests.get(state.serving) or (state.manifests[max(state.manifests)] if state.manifests else {}))
    aliases = dict(state.aliases, **({"latest": state.serving} if state.serving is not None else {}))
    return ModelInfo(
        name=state.name, architecture=newest.get("architecture"), parameter_count=newest.get("parameter_count"),
        input="any" if any_size_model(newest) else "8x8", degradation=newest.get("degradation") or DEFAULT_DEGRADATION,
        input_routing=input_routing(state, newest),
        is_default=state.name == manager.default_model, serving_version=state.serving, loaded_versions=sorted(state.loaded),
        aliases=aliases, versions=[version_info(state, v) for v in state.versions],
    )


def input_routing(state: ModelState, newest: dict) -> str | None:
    if newest.get("degradation") != inputs.REALISTIC or inputs.CLEAN_ALIAS not in state.aliases or not any_size_model(newest):
        return None
    return (f"JPEGs below quality {inputs.CLEAN_JPEG_QUALITY} and photos with noise above {inputs.CLEAN_NOISE_SIGMA:g} levels: "
            f"version {state.serving} ({inputs.REALISTIC}); clean photos: version {state.aliases[inputs.CLEAN_ALIAS]} "
            f"(alias {inputs.CLEAN_ALIAS}); a request naming a version gets that version")


@router.get("", summary="Every model in the store, its versions and what is loaded", response_model=ModelList)
async def list_models(manager: ManagerDep) -> ModelList:
    return ModelList(default_model=manager.default_model, device=str(manager.device), precision=manager.precision, models=[model_info(manager, s) for _, s in sorted(manager.models.items())])


@router.get("/{name}", summary="One model", response_model=ModelInfo, responses=_NOT_FOUND)
async def get_model(name: NameParam, manager: ManagerDep) -> ModelInfo:
    return model_info(manager, await manager.model_state(name))


@router.get("/{name}/versions/{version}", summary="One version with its full manifest", response_model=VersionDetail, responses=_NOT_FOUND)
async def get_version(name: NameParam, version: VersionParam, manager: ManagerDep) -> VersionInfo:
    state = await manager.model_state(name)
    return version_info(state, await manager.version_number(state, version), detail=True)


@router.get("/{name}/versions/{version}/{picture}", summary="The trainer's loss or learning curve (photo models) or sample grid", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, **_NOT_FOUND})
async def get_picture(name: NameParam, version: VersionParam, picture: Literal["loss_curve.png", "learning_curve.png", "samples.png"], manager: ManagerDep) -> Response:
    state = await manager.model_state(name)
    number = await manager.version_number(state, version)
    try:
        data = await off_loop(manager.store.read_file, name, number, picture)
    except StoreUnavailable:
        raise unavailable("store_unavailable", "the model store cannot be read right now", manager.settings.retry_after_s) from None
    except StoreError:
        raise ApiError(404, "file_not_found", f"model {name!r} version {number} has no {picture}") from None
    return Response(data, media_type="image/png")


_ALIAS_BODY = {"required": True, "content": {"application/json": {"schema": AliasUpdate.model_json_schema()}}}


@router.put("/{name}/aliases/{alias}", summary="Point an alias (e.g. stable) at a version: promote or roll back",
            response_model=AliasResponse, dependencies=[Depends(require_admin)], openapi_extra={"requestBody": _ALIAS_BODY},
            responses={400: {"model": ErrorResponse, "description": "The body is not JSON."},
                       401: {"model": ErrorResponse, "description": "Wrong or missing admin token."},
                       403: {"model": ErrorResponse, "description": "UPGRADER_ADMIN_TOKEN is not set: admin is disabled."},
                       409: {"model": ErrorResponse, "description": "The version failed verification."},
                       422: {"model": ErrorResponse, "description": "Reserved or invalid alias, or a body that is not {\"version\": ...}."},
                       **_NOT_FOUND})
async def put_alias(name: NameParam, alias: Annotated[str, Path(description="Alias name: a letter, then letters, digits, `_`, `.` or `-`; latest is reserved.",
                                                       pattern=ALIAS_PATTERN, json_schema_extra={"not": {"const": "latest"}})],
                    request: Request, manager: ManagerDep) -> AliasResponse:
    # The body is read here, not declared as a parameter: FastAPI parses declared bodies before it runs
    # dependencies, and a caller without the admin token must get 401 whatever it sent.
    update = parse_alias_update(await request.body())
    version = await manager.set_alias(name, alias, str(update.version))
    return AliasResponse(name=name, alias=alias, version=version)


def parse_alias_update(raw: bytes) -> AliasUpdate:
    try:
        return AliasUpdate.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where, what = validation_message(error)
        if error["type"] == "json_invalid":
            raise ApiError(400, "invalid_json", f"the body is not valid JSON: {what}") from None
        raise ApiError(422, "invalid_body", f"{where or 'body'}: {what}; send {{\"version\": <number or alias>}}") from None
