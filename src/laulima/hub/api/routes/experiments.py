"""Experiments for the data scientist: submit, watch, cancel, fetch the model and the record."""

from __future__ import annotations

from fastapi import APIRouter, status

from laulima.core.protocol import (
    ExperimentCreate,
    ExperimentPublic,
    MetricRecord,
    RefusalRecord,
    RoundPublic,
)
from laulima.hub.api.deps import Admin, BlobsDep, OrchestratorDep, ServiceDep
from laulima.hub.api.routes.blobs import BlobFile, blob_response

__all__ = ["router"]

router = APIRouter(prefix="/experiments", tags=["experiments"])


@router.post("", status_code=status.HTTP_201_CREATED)
def create_experiment(
    body: ExperimentCreate, _: Admin, service: ServiceDep, orchestrator: OrchestratorDep
) -> ExperimentPublic:
    created = service.create_experiment(body)
    orchestrator.wake()
    return created


@router.get("")
def list_experiments(_: Admin, service: ServiceDep) -> list[ExperimentPublic]:
    return service.list_experiments()


@router.get("/{experiment_id}")
def get_experiment(experiment_id: int, _: Admin, service: ServiceDep) -> ExperimentPublic:
    return service.get_experiment(experiment_id)


@router.post("/{experiment_id}/cancel")
def cancel_experiment(
    experiment_id: int, _: Admin, service: ServiceDep, orchestrator: OrchestratorDep
) -> ExperimentPublic:
    experiment = service.cancel_experiment(experiment_id)
    orchestrator.wake()
    return experiment


@router.get("/{experiment_id}/rounds")
def list_rounds(experiment_id: int, _: Admin, service: ServiceDep) -> list[RoundPublic]:
    return service.rounds(experiment_id)


@router.get("/{experiment_id}/metrics")
def list_metrics(experiment_id: int, _: Admin, service: ServiceDep) -> list[MetricRecord]:
    return service.metrics(experiment_id)


@router.get("/{experiment_id}/refusals")
def list_refusals(experiment_id: int, _: Admin, service: ServiceDep) -> list[RefusalRecord]:
    return service.refusals(experiment_id)


@router.get("/{experiment_id}/model", response_class=BlobFile)
def download_model(experiment_id: int, _: Admin, service: ServiceDep, blobs: BlobsDep) -> BlobFile:
    experiment = service.get_experiment(experiment_id)
    digest = experiment.global_digest
    filename = f"{experiment.name}-round{experiment.rounds_done}.safetensors"
    return blob_response(blobs.path(digest), digest, filename)
