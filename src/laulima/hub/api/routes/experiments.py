"""Experiments for the data scientist (or the operator): submit, watch, cancel, fetch the model and the record."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, status

from laulima.core.protocol import (
    ExperimentCreate,
    ExperimentPublic,
    MetricRecord,
    RefusalRecord,
    RoundPublic,
)
from laulima.hub.api.deps import BlobsDep, OrchestratorDep, RowId, Scientist, ServiceDep
from laulima.hub.api.routes.blobs import BlobFile, blob_response

__all__ = ["router"]

router = APIRouter(prefix="/experiments", tags=["experiments"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_experiment(
    body: ExperimentCreate, _: Scientist, service: ServiceDep, orchestrator: OrchestratorDep
) -> ExperimentPublic:
    created = service.create_experiment(body)
    orchestrator.wake()
    return created


@router.get("")
def list_experiments(_: Scientist, service: ServiceDep) -> list[ExperimentPublic]:
    return service.list_experiments()


@router.get("/{experiment_id}")
def get_experiment(experiment_id: RowId, _: Scientist, service: ServiceDep) -> ExperimentPublic:
    return service.get_experiment(experiment_id)


@router.post("/{experiment_id}/cancel")
def cancel_experiment(
    experiment_id: RowId, _: Scientist, service: ServiceDep, orchestrator: OrchestratorDep
) -> ExperimentPublic:
    experiment = service.cancel_experiment(experiment_id)
    orchestrator.wake()
    return experiment


@router.get("/{experiment_id}/rounds")
def list_rounds(experiment_id: RowId, _: Scientist, service: ServiceDep) -> list[RoundPublic]:
    return service.rounds(experiment_id)


@router.get("/{experiment_id}/metrics")
def list_metrics(experiment_id: RowId, _: Scientist, service: ServiceDep) -> list[MetricRecord]:
    return service.metrics(experiment_id)


@router.get("/{experiment_id}/refusals")
def list_refusals(experiment_id: RowId, _: Scientist, service: ServiceDep) -> list[RefusalRecord]:
    return service.refusals(experiment_id)


@router.get(
    "/{experiment_id}/model",
    response_class=BlobFile,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors"}},
)
async def download_model(experiment_id: RowId, _: Scientist, service: ServiceDep, blobs: BlobsDep) -> BlobFile:
    experiment = await anyio.to_thread.run_sync(service.get_experiment, experiment_id)
    digest = experiment.global_digest
    filename = f"{experiment.name}-round{experiment.rounds_done}.safetensors"
    return await blob_response(blobs, digest, filename)
