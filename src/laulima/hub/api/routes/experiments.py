"""Experiments for the data scientist (or the operator): submit, watch, cancel, share, fetch
the model and the record.

Each experiment belongs to the person who submitted it; operators see all. Who may read
or act on one is decided in :mod:`laulima.hub.ownership`: a person who may not read an
experiment gets the 404 of an unknown id; a person it is shared with may read it but only
its owner or an operator may cancel it or change its sharing (403).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

import anyio
from fastapi import APIRouter, Path, Query, status

from laulima.core.protocol import (
    CrossSiteMatrix,
    ExperimentCreate,
    ExperimentPublic,
    FingerprintPublic,
    MetricRecord,
    RefusalRecord,
    RoundPublic,
    ShareCreate,
)
from laulima.hub.api.deps import BlobsDep, Caller, OrchestratorDep, RowId, Scientist, ServiceDep, SettingsDep
from laulima.hub.api.routes.blobs import BlobFile, blob_response
from laulima.hub.audit import HubAudit, HubAuditDep, HubAuditEvent, spec_facts
from laulima.hub.blobstore import BlobStore
from laulima.hub.orchestrator import Orchestrator
from laulima.hub.service import HubService

__all__ = ["cancel", "router", "serve_model"]

router = APIRouter(prefix="/experiments", tags=["experiments"])

ModelQuery = Annotated[
    str | None,
    Query(
        pattern=r"^(global|model|local:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$",
        description="Which model: global (default), local:<site> (a local-only model of the cross-site "
        "evaluation), or model (an evaluate-mode experiment's)",
    ),
]

PersonName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$", description="A person's name")]


@router.post("", status_code=status.HTTP_201_CREATED)
def create_experiment(
    body: ExperimentCreate,
    caller: Scientist,
    service: ServiceDep,
    orchestrator: OrchestratorDep,
    settings: SettingsDep,
    audit: HubAuditDep,
) -> ExperimentPublic:
    audit.require("accept an experiment")
    created = service.create_experiment(body, caller.person, max_running=settings.person_max_running_experiments)
    audit.record(
        HubAuditEvent.SUBMITTED,
        caller,
        experiment=created.id,
        initial_weights=body.initial_weights,
        **spec_facts(created.spec),
    )
    orchestrator.wake()
    return created


@router.get("")
def list_experiments(caller: Scientist, service: ServiceDep) -> list[ExperimentPublic]:
    """Your experiments and those shared with you (an operator: all)."""
    return service.list_experiments(caller.person)


@router.get("/{experiment_id}")
def get_experiment(experiment_id: RowId, caller: Scientist, service: ServiceDep) -> ExperimentPublic:
    return service.get_experiment(experiment_id, caller.person)


@router.post("/{experiment_id}/cancel")
def cancel_experiment(
    experiment_id: RowId, caller: Scientist, service: ServiceDep, orchestrator: OrchestratorDep, audit: HubAuditDep
) -> ExperimentPublic:
    return cancel(experiment_id, caller, service, orchestrator, audit)


def cancel(
    experiment_id: int, caller: Caller, service: HubService, orchestrator: Orchestrator, audit: HubAudit
) -> ExperimentPublic:
    """Cancel an experiment for ``caller`` and record it: the API's route and the dashboard's button."""
    experiment = service.cancel_experiment(experiment_id, caller.person)
    audit.record(
        HubAuditEvent.CANCELLED, caller, experiment=experiment.id, name=experiment.name, owner=experiment.owner
    )
    orchestrator.wake()
    return experiment


@router.post("/{experiment_id}/shares")
def share_experiment(
    experiment_id: RowId, body: ShareCreate, caller: Scientist, service: ServiceDep, audit: HubAuditDep
) -> ExperimentPublic:
    """Let another person read this experiment (its owner or an operator may)."""
    audit.require("share an experiment")
    shared = service.share_experiment(experiment_id, caller.person, body.name)
    audit.record(HubAuditEvent.SHARED, caller, experiment=shared.id, with_person=body.name, owner=shared.owner)
    return shared


@router.delete("/{experiment_id}/shares/{name}")
def unshare_experiment(
    experiment_id: RowId, name: PersonName, caller: Scientist, service: ServiceDep, audit: HubAuditDep
) -> ExperimentPublic:
    unshared = service.unshare_experiment(experiment_id, caller.person, name)
    audit.record(HubAuditEvent.UNSHARED, caller, experiment=unshared.id, with_person=name, owner=unshared.owner)
    return unshared


@router.get("/{experiment_id}/rounds")
def list_rounds(experiment_id: RowId, caller: Scientist, service: ServiceDep) -> list[RoundPublic]:
    return service.rounds(experiment_id, caller.person)


@router.get("/{experiment_id}/metrics")
def list_metrics(experiment_id: RowId, caller: Scientist, service: ServiceDep) -> list[MetricRecord]:
    return service.metrics(experiment_id, caller.person)


@router.get("/{experiment_id}/refusals")
def list_refusals(experiment_id: RowId, caller: Scientist, service: ServiceDep) -> list[RefusalRecord]:
    return service.refusals(experiment_id, caller.person)


@router.get("/{experiment_id}/cross-site")
def cross_site(experiment_id: RowId, caller: Scientist, service: ServiceDep) -> CrossSiteMatrix:
    """The evaluation after training as models x sites, pooled per model (404 for an experiment
    whose spec asks for none). Readable while it runs: ``complete`` says when it is final."""
    return service.cross_site(experiment_id, caller.person)


@router.get("/{experiment_id}/fingerprint")
def fingerprint(experiment_id: RowId, caller: Scientist, service: ServiceDep) -> FingerprintPublic:
    """The merged dataset fingerprint of a completed fingerprint-mode experiment (nnU-Net's
    dataset_fingerprint.json and dataset.json), with the sites in it and why any is missing.
    409 while it runs, once it failed, or for an experiment of another mode."""
    return service.fingerprint(experiment_id, caller.person)


@router.get(
    "/{experiment_id}/model",
    response_class=BlobFile,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "safetensors"}},
)
async def download_model(
    experiment_id: RowId,
    caller: Scientist,
    service: ServiceDep,
    blobs: BlobsDep,
    audit: HubAuditDep,
    model: ModelQuery = None,
) -> BlobFile:
    """The newest global model, or with ``?model=local:<site>`` a site's local-only model (404
    naming the experiment's models for any other)."""
    return await serve_model(experiment_id, caller, service, blobs, audit, model)


async def serve_model(
    experiment_id: int, caller: Caller, service: HubService, blobs: BlobStore, audit: HubAudit, model: str | None
) -> BlobFile:
    """A model as an audited download: the API's route and the dashboard's link both come here."""
    found = await anyio.to_thread.run_sync(partial(service.model_of, experiment_id, caller.person, model))
    experiment, digest, label = found
    if label.startswith("local:"):
        filename = f"{experiment.name}-{label.replace(':', '-')}.safetensors"
    else:
        filename = f"{experiment.name}-round{experiment.rounds_done}.safetensors"
    await anyio.to_thread.run_sync(audit.require, "hand out a model")
    response = await blob_response(blobs, digest, filename)
    size = int(response.headers["content-length"])
    which = {"model": label} if model is not None else {}  # which model, when one was asked for
    record = partial(audit.record, HubAuditEvent.DOWNLOADED, caller, experiment=experiment.id, what="model", **which)
    await anyio.to_thread.run_sync(partial(record, digest=digest, bytes=size, round=experiment.rounds_done))
    return response
