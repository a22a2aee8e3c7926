"""The hub dashboard's pages: the federation at a glance, and one experiment live.

Every page reads through :class:`~laulima.hub.service.HubService` with the signed-in
person, exactly as the REST API does, so ownership and sharing apply unchanged (another
person's experiment is a 404, the sites table is an operator's). Regions marked live are
re-fetched by ``live.js``; each answers with an ETag of its content, and 304 when nothing
changed, so an idle page costs the hub a render every few seconds and the browser nothing.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from laulima.core.protocol import ExperimentPublic, ExperimentStatus, Role, RoundPublic, SiteStatus
from laulima.errors import NotFound
from laulima.hub.api.deps import Caller, HubContext, RowId
from laulima.hub.api.routes.experiments import ModelQuery, cancel, serve_model
from laulima.hub.audit import HubAudit
from laulima.hub.ownership import Person
from laulima.hub.ui import views
from laulima.hub.ui.freshness import experiment_version
from laulima.web.auth import SignIn
from laulima.web.forms import read_form
from laulima.web.security import SECURITY_HEADERS
from laulima.web.sessions import UiUser
from laulima.web.templating import Pages, format_ago

__all__ = ["LIVE_EVERY_MS", "build_router"]

Rounds = list[RoundPublic]

LIVE_EVERY_MS = 2000
"""How often a live region asks whether it changed."""


def current_user(request: Request) -> UiUser:
    """The signed-in person (the dashboard keeps its :class:`SignIn` in its state)."""
    sign_in: SignIn = request.app.state.sign_in
    return sign_in.user(request)


User = Annotated[UiUser, Depends(current_user)]


def build_router(pages: Pages, sign_in: SignIn) -> APIRouter:
    """The dashboard's routes, bound to its pages and its sign-in."""
    router = APIRouter()
    sign_in.add_routes(router)

    def hub_of(request: Request) -> HubContext:
        return request.app.state.hub  # type: ignore[no-any-return]

    def audit_of(request: Request) -> HubAudit:
        return request.app.state.audit  # type: ignore[no-any-return]

    def common(user: UiUser, page: str) -> dict[str, Any]:
        return {"user": user, "csrf": user.csrf, "page": page, "live_every": LIVE_EVERY_MS}

    # -- the overview -----------------------------------------------------------------------------
    def overview_data(request: Request, user: UiUser) -> dict[str, Any]:
        hub = hub_of(request)
        experiments = hub.service.list_experiments(_person(user))
        experiments.sort(key=lambda e: (e.status != ExperimentStatus.RUNNING, -e.created_at))
        sites = hub.service.list_sites() if user.role == Role.OPERATOR else None
        now = hub.clock()
        return {
            "experiments": experiments,
            "running": sum(e.status == ExperimentStatus.RUNNING for e in experiments),
            "sites": sites,
            "online": sum(s.status == SiteStatus.ONLINE for s in sites or []),
            "seen": {s.name: format_ago(s.last_seen, now) for s in sites or []},
        }

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def overview(request: Request, user: User) -> Response:
        data = overview_data(request, user)
        return pages.page(request, "overview.html", {**common(user, "overview"), **data})

    @router.get("/live/overview", response_class=HTMLResponse, include_in_schema=False)
    def overview_live(request: Request, user: User) -> Response:
        return pages.fragment(request, "_overview_live.html", overview_data(request, user))

    # -- one experiment -----------------------------------------------------------------------------
    def experiment_state(request: Request, user: UiUser, experiment_id: int) -> tuple[ExperimentPublic, Rounds, str]:
        """The experiment, its rounds and the ETag of its live region (read first: never newer than the data)."""
        hub, person = hub_of(request), _person(user)
        experiment = hub.service.get_experiment(experiment_id, person)
        rounds = hub.service.rounds(experiment_id, person)
        return experiment, rounds, f'"{experiment_version(hub, experiment, rounds)}"'

    def experiment_data(request: Request, user: UiUser, experiment: ExperimentPublic, rounds: Rounds) -> dict[str, Any]:
        hub, person, experiment_id = hub_of(request), _person(user), experiment.id
        metrics = hub.service.metrics(experiment_id, person)
        refusals = hub.service.refusals(experiment_id, person)
        matrix = None
        if (experiment.spec.get("evaluation") or {}).get("cross_site") or experiment.mode == "evaluate":
            try:
                matrix = views.cross_site_view(hub.service.cross_site(experiment_id, person))
            except NotFound:
                matrix = None
        open_round = next((r for r in sorted(rounds, key=lambda r: -r.index) if r.status == "open"), None)
        return {
            "experiment": experiment,
            "progress": _progress(experiment),
            "summary": views.spec_summary(experiment.spec),
            "charts": views.charts(metrics),
            "rounds": views.round_rows(rounds),
            "left_out": open_round.left_out if open_round else {},
            "matrix": matrix,
            "refusals": sorted(refusals, key=lambda r: -r.at)[:20],
            "epsilon": views.epsilon_summary(metrics),
            **_actions(experiment, user),
        }

    @router.get("/experiments/{experiment_id}", response_class=HTMLResponse, include_in_schema=False)
    def experiment_page(request: Request, experiment_id: RowId, user: User) -> Response:
        experiment, rounds, etag = experiment_state(request, user, experiment_id)
        data = experiment_data(request, user, experiment, rounds)
        context = {**common(user, "experiment"), **data, "live_etag": etag}
        return pages.page(request, "experiment.html", context)

    @router.get("/experiments/{experiment_id}/live", response_class=HTMLResponse, include_in_schema=False)
    def experiment_live(request: Request, experiment_id: RowId, user: User) -> Response:
        experiment, rounds, etag = experiment_state(request, user, experiment_id)
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={**SECURITY_HEADERS, "ETag": etag})
        data = experiment_data(request, user, experiment, rounds)
        return pages.fragment(request, "_experiment_live.html", data, etag=etag)

    @router.get("/experiments/{experiment_id}/live/actions", response_class=HTMLResponse, include_in_schema=False)
    def experiment_actions(request: Request, experiment_id: RowId, user: User) -> Response:
        """The buttons, apart from the rest: they change once (when the experiment ends), so a
        keyboard user's focus on one is not lost at every refresh of the charts."""
        experiment = hub_of(request).service.get_experiment(experiment_id, _person(user))
        data = {"experiment": experiment, "csrf": user.csrf, **_actions(experiment, user)}
        return pages.fragment(request, "_experiment_actions.html", data)

    @router.post("/experiments/{experiment_id}/cancel", include_in_schema=False)
    async def cancel_experiment(request: Request, experiment_id: RowId, user: User) -> Response:
        form = await read_form(request)
        sign_in.check_form(request, form, user)
        hub = hub_of(request)
        await anyio.to_thread.run_sync(
            cancel, experiment_id, _caller(user), hub.service, hub.orchestrator, audit_of(request)
        )
        return RedirectResponse(
            f"{pages.base_path}/experiments/{experiment_id}?cancelled=1", status_code=303, headers=SECURITY_HEADERS
        )

    @router.get("/experiments/{experiment_id}/model", include_in_schema=False)
    async def download_model(request: Request, experiment_id: RowId, user: User, model: ModelQuery = None) -> Response:
        hub = hub_of(request)
        return await serve_model(experiment_id, _caller(user), hub.service, hub.blobs, audit_of(request), model)

    @router.get("/experiments/{experiment_id}/card", include_in_schema=False)
    def download_card(request: Request, experiment_id: RowId, user: User) -> Response:
        hub, person = hub_of(request), _person(user)
        experiment = hub.service.get_experiment(experiment_id, person)
        card = views.model_card(
            experiment, hub.service.rounds(experiment_id, person), hub.service.metrics(experiment_id, person)
        )
        body = json.dumps(card, indent=2, sort_keys=False, allow_nan=False).encode()
        filename = f"{experiment.name}-round{experiment.rounds_done}.card.json"
        headers = {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{_ascii(filename)}"'}
        return Response(body, media_type="application/json", headers=headers)

    return router


def _actions(experiment: ExperimentPublic, user: UiUser) -> dict[str, bool]:
    """Which buttons the page offers: a model once there is one, cancel to its owner or an operator."""
    return {
        "may_cancel": experiment.status == ExperimentStatus.RUNNING
        and (user.role == Role.OPERATOR or experiment.owner == user.name),
        "has_model": experiment.rounds_done >= 1 or experiment.mode == "evaluate",
    }


def _person(user: UiUser) -> Person:
    return Person(user.name, operator=user.role == Role.OPERATOR)


def _caller(user: UiUser) -> Caller:
    return Caller(Role(user.role), user.name)


def _progress(experiment: ExperimentPublic) -> dict[str, Any]:
    total = max(experiment.rounds, 1)
    done = min(experiment.rounds_done, total)
    return {"done": done, "total": experiment.rounds, "percent": round(100 * done / total)}


def _ascii(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
