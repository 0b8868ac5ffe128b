"""The application layer: one module per job, shared by the window, the CLI, recipes and the self-test.

Each job module has a frozen ``*Spec`` (what to do), ``run(lm, spec, ctx) -> result`` and, where
the run is recorded, ``record(lm, spec, result) -> RunRecord``. :class:`JobContext` carries
cancel / progress / partial results / streamed text under one set of names. Qt-free.

Adding a job: a module here (Spec, run, record), an entry in ``JOBS``, its panel (builds the
Spec, renders the result) and its CLI subcommand (argparse -> Spec -> :func:`run` -> print).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import bake, calibrate, compute, diagnose, generate, grid, load, method_compare, rerun, search, sweep, versus
from .bake import BakeSpec
from .calibrate import CalibrateSpec
from .compute import ComputeSpec
from .context import JobContext
from .diagnose import DiagnoseSpec
from .generate import GenerateSpec
from .grid import GridSpec
from .load import LoadSpec
from .method_compare import CompareSpec
from .rerun import Rerun, RerunSpec
from .search import SearchSpec
from .steering_spec import SteeringSpec
from .sweep import SweepSpec
from .versus import VersusSpec

JOBS: dict[type, ModuleType] = {
    LoadSpec: load,
    ComputeSpec: compute,
    GenerateSpec: generate,
    SweepSpec: sweep,
    DiagnoseSpec: diagnose,
    VersusSpec: versus,
    GridSpec: grid,
    BakeSpec: bake,
    SearchSpec: search,
    RerunSpec: rerun,
    CalibrateSpec: calibrate,
    CompareSpec: method_compare,
}


def job_for(spec: Any) -> ModuleType:
    """The job module that runs ``spec`` (``TypeError`` for an object that is no job Spec)."""
    try:
        return JOBS[type(spec)]
    except KeyError:
        raise TypeError(f"{type(spec).__name__} is not a job spec") from None


def run(lm: Any, spec: Any, ctx: JobContext | None = None) -> Any:
    """Run the job ``spec`` names on ``lm`` (``None`` only for a load)."""
    return job_for(spec).run(lm, spec, ctx or JobContext())


def record(lm: Any, spec: Any, result: Any, **kwargs: Any) -> Any:
    """The job's :class:`~steerdesk.core.records.RunRecord` of a finished run, or None if the job records none.

    ``kwargs`` go to the job's ``record`` (``seconds=`` for diagnose / versus / grid, whose results
    carry no time).
    """
    make = getattr(job_for(spec), "record", None)
    return None if make is None else make(lm, spec, result, **kwargs)


__all__ = [
    "JOBS",
    "BakeSpec",
    "CalibrateSpec",
    "CompareSpec",
    "ComputeSpec",
    "DiagnoseSpec",
    "GenerateSpec",
    "GridSpec",
    "JobContext",
    "LoadSpec",
    "Rerun",
    "RerunSpec",
    "SearchSpec",
    "SteeringSpec",
    "SweepSpec",
    "VersusSpec",
    "job_for",
    "record",
    "run",
]
