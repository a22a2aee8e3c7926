"""``laulima nnunet``: plan a federated nnU-Net experiment on the submitting machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["nnunet_app"]

console = Console(soft_wrap=True, highlight=False, emoji=False)

nnunet_app = typer.Typer(help="Federated nnU-Net: plan from the federation's fingerprint.", no_args_is_help=True)


@nnunet_app.command("plan")
def plan_command(
    folder: Annotated[
        Path,
        typer.Argument(
            help="The folder `laulima experiment fingerprint --out` wrote (dataset_fingerprint.json, "
            "dataset.json); nnUNetPlans.json is written beside them."
        ),
    ],
    spec: Annotated[
        Path | None,
        typer.Option(
            help="The training spec whose [config.planner] shapes the plan (default: nnU-Net's own settings)."
        ),
    ] = None,
) -> None:
    """Run nnU-Net's own planner on the federation's merged fingerprint.

    Then name the files in the training spec — `[config] plans = "FOLDER/nnUNetPlans.json"`,
    `dataset_json = "FOLDER/dataset.json"` — and `laulima experiment submit` it: the documents
    are read in at submission and travel with every task.
    """
    from laulima.core.spec import load_spec
    from laulima.nnunet.workflow import (
        DATASET_FILE,
        FINGERPRINT_FILE,
        PLANS_FILE,
        plan,
        read_json_document,
        write_plan_files,
    )

    missing = f"run `laulima experiment fingerprint SPEC --out {folder}` first"
    documents = {
        name: read_json_document(folder / name, missing=f"{folder / name} does not exist; {missing}")
        for name in (FINGERPRINT_FILE, DATASET_FILE)
    }
    config = dict(load_spec(spec).config) if spec is not None else {}
    plans = plan(documents[FINGERPRINT_FILE], documents[DATASET_FILE], config)
    write_plan_files(folder, documents[FINGERPRINT_FILE], documents[DATASET_FILE], plans)
    configurations = ", ".join(sorted(plans.get("configurations", {})))
    console.print(f"nnU-Net plans ({configurations}) → {folder / PLANS_FILE}")
