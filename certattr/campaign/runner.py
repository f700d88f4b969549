"""Campaign runners: the driver expands the grid, workers compute units, the driver alone writes.

Backends (same code path: every backend calls :func:`certattr.campaign.units.execute_unit`):

* ``local`` with ``workers=1``: units run in the driver process (all cores to torch);
* ``local`` with ``workers=N>1`` (default: one per core, at most 8): a spawn-started process pool,
  ``torch.set_num_threads(cores // N)`` per worker, models loaded once per worker from the checkpoint
  path;
* ``ray``: remote tasks (``num_cpus=1`` each, one torch thread unless ``threads`` says), the model shipped
  once through the object store (so workers need no shared file system), each unit's images sent
  with its task, rows sent back to the driver, which alone writes the store.  Without an address, a
  private local Ray is started on 127.0.0.1 with ``num_cpus=workers`` and no dashboard.

  A real cluster: ``ray start --head --port=6379`` on the head node, ``ray start --address=HEAD:6379``
  on every worker node (each with the same certattr, torch and ray versions installed), then on a
  cluster node ``certattr campaign spec.toml --store results.sqlite --backend ray --ray-address auto
  --workers 256``, or from outside through Ray Client ``--ray-address ray://HEAD:10001``; setting
  ``RAY_ADDRESS`` does the same as ``--ray-address`` (from Python: ``run_campaign(...,
  backend="ray", ray_address=...)``).  ``--workers`` sets how many tasks are kept in flight (twice the
  larger of it and the cluster's CPUs).  Ray writes a session folder under /tmp/ray and an auth token
  under ~/.ray.

Units are committed one transaction each as they finish, so the campaign can be killed and rerun at
any moment (see :mod:`certattr.campaign.store`).  The pool starts its workers with "spawn": a script
that calls :func:`run_campaign` with ``workers > 1`` needs the ``if __name__ == "__main__":`` guard.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CertattrError
from .spec import CampaignSpec
from .store import Store
from .units import Unit, execute_unit, expand, total_rows

BACKENDS = ("local", "ray")


@dataclass
class RunSummary:
    """What one campaign invocation did."""

    store: str
    total_rows: int  # rows of the complete campaign
    rows_before: int  # already in the store when this run started
    rows_written: int
    units_run: int
    seconds: float
    backend: str
    workers: int
    checkpoints: dict[str, str] = field(default_factory=dict)  # sha256 -> path

    @property
    def complete(self) -> bool:
        return self.rows_before + self.rows_written >= self.total_rows


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """One worker process per core (at most 8), each with one torch thread: process parallelism beats
    intra-op threads for the small batches of a campaign, and single-threaded workers do not stall when
    a shared machine takes a core away (OpenMP barriers wait for descheduled threads)."""
    return max(1, min(cpu_cores(), 8))


def threads_per_worker(workers: int) -> int:
    return max(1, cpu_cores() // max(1, workers))


def versions() -> dict[str, str]:
    import numpy

    from .. import __version__

    return {"certattr": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0], "platform": platform.platform()}


# --------------------------------------------------------------------------- preparation

def prepare_checkpoints(spec: CampaignSpec, store: Store | None, *, device: str = "cpu",
                        progress: bool = True) -> dict[str, str]:
    """Resolve (train zoo references), hash and record every checkpoint: returns sha256 -> path."""
    from .. import checkpoint
    from .zoo import resolve_checkpoint

    out: dict[str, str] = {}
    for ref in spec.checkpoints:
        path = resolve_checkpoint(spec.checkpoint_path(ref), device=device, progress=progress)
        info = checkpoint.info(path)
        sha = info["sha256"]
        if sha in out:
            raise CertattrError(f"checkpoints {out[sha]} and {path} have identical weights (sha256 {sha[:12]})")
        out[sha] = str(path)
        if store is not None:
            store.add_checkpoint(sha, str(path), ref, info)
    return out


def load_samples(spec: CampaignSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The campaign's sample slice (x, y) of the dataset split."""
    from ..data import load_dataset, subset

    x, y = load_dataset(spec.dataset, spec.split, spec.root)
    try:
        return subset(x, y, spec.start, spec.n)
    except CertattrError as exc:
        raise CertattrError(f"campaign spec: data: {exc}") from None


def _check_model_fits(path: str, x: torch.Tensor) -> None:
    from .. import checkpoint

    model = checkpoint.load(path)
    try:
        with torch.no_grad():
            out = model(x[:1])
    except RuntimeError as exc:
        raise CertattrError(f"checkpoint {path} does not accept the campaign's inputs "
                            f"{tuple(x.shape[1:])}: {str(exc).splitlines()[0]}") from None
    if out.dim() != 2:
        raise CertattrError(f"checkpoint {path} returns shape {tuple(out.shape)}, not (batch, classes) logits")


# --------------------------------------------------------------------------- driver

def run_campaign(spec: CampaignSpec, store_path: str | Path, *, workers: int | None = None, backend: str = "local",
                 device: str = "cpu", progress: bool = True, ray_address: str | None = None,
                 threads: int | None = None, max_units: int | None = None,
                 log: Callable[[str], None] | None = None) -> RunSummary:
    """Run (or resume) ``spec`` into the SQLite store at ``store_path``.

    ``workers``: parallel workers (default :func:`default_workers`: one per core, at most 8; 1 runs the
    units in this process).  ``threads``: torch intra-op threads per worker (default cores // workers).  ``max_units`` stops
    after that many units (for tests and benchmarks).  Raises CertattrError on bad settings and when a
    unit fails (units finished before stay committed).
    """
    if backend not in BACKENDS:
        raise CertattrError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if workers is None:
        workers = default_workers()
    if int(workers) < 1:
        raise CertattrError(f"workers must be >= 1, got {workers}")
    workers = int(workers)
    if threads is not None and int(threads) < 1:
        raise CertattrError(f"threads must be >= 1, got {threads}")
    if threads is None:  # a Ray task holds one CPU of its node: one thread unless told otherwise
        threads = 1 if backend == "ray" else threads_per_worker(workers)
    threads = int(threads)
    say = log or (lambda msg: None)
    t0 = time.perf_counter()
    x_all, y_all = load_samples(spec)
    with Store(store_path) as store:
        checkpoints = prepare_checkpoints(spec, store, device=device, progress=progress)
        for path in checkpoints.values():
            _check_model_fits(path, x_all)
        for m in spec.methods:
            store.add_method(m.label, m.family, m.name, m.restarts, m.params)
        units, before = expand(spec, checkpoints, store)
        if max_units is not None:
            units = units[: int(max_units)]
        total = total_rows(spec)
        say(f"campaign {spec.name!r}: {total} rows in all, {before} already stored, {len(units)} units to run "
            f"({backend}, {workers} worker{'s' if workers > 1 else ''}, {threads} torch "
            f"thread(s) each, device {device})")
        run_id = store.start_run(spec.text, spec.seed, versions(),
                                 {"backend": backend, "workers": workers, "threads": threads, "device": device})
        written = 0
        bar = tqdm(total=sum(len(u.samples) for u in units), desc=spec.name, unit="row", disable=not progress,
                   dynamic_ncols=True)
        try:
            for unit, rows in _dispatch(units, x_all, y_all, spec.start, workers=workers, threads=threads,
                                        backend=backend, device=device, checkpoints=checkpoints,
                                        ray_address=ray_address):
                written += store.write_unit(rows)
                bar.update(len(rows))
        finally:
            bar.close()
            store.finish_run(run_id, written)
    return RunSummary(store=str(store_path), total_rows=total, rows_before=before, rows_written=written,
                      units_run=len(units), seconds=time.perf_counter() - t0, backend=backend, workers=workers,
                      checkpoints=checkpoints)


def _payload(unit: Unit, x_all: torch.Tensor, y_all: torch.Tensor, start: int):
    idx = torch.tensor([s - start for s in unit.samples], dtype=torch.long)
    return x_all[idx].contiguous(), y_all[idx].contiguous()


def _dispatch(units: list[Unit], x_all, y_all, start: int, *, workers: int, threads: int, backend: str,
              device: str, checkpoints: dict[str, str], ray_address: str | None
              ) -> Iterator[tuple[Unit, list[dict]]]:
    if not units:
        return iter(())
    if backend == "ray":
        return _run_ray(units, x_all, y_all, start, workers=workers, threads=threads, device=device,
                        checkpoints=checkpoints, address=ray_address)
    if workers == 1:
        return _run_inline(units, x_all, y_all, start, threads=threads, device=device)
    return _run_pool(units, x_all, y_all, start, workers=workers, threads=threads, device=device)


def _unit_failed(unit: Unit, exc: BaseException) -> CertattrError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CertattrError(f"unit {unit.describe()} failed: {type(exc).__name__}: {msg}")


# --------------------------------------------------------------------------- local backends

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def _model(path: str, device: str) -> torch.nn.Module:
    key = (path, str(device))
    if key not in _MODELS:
        from .. import checkpoint

        _MODELS[key] = checkpoint.load(path, map_location=device)
    return _MODELS[key]


def _run_inline(units, x_all, y_all, start, *, threads, device):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for unit in units:
            x, y = _payload(unit, x_all, y_all, start)
            try:
                rows = execute_unit(unit, _model(unit.ckpt_path, device), x, y, device)
            except Exception as exc:
                raise _unit_failed(unit, exc) from exc
            yield unit, rows
    finally:
        torch.set_num_threads(previous)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def _pool_task(unit: Unit, x: torch.Tensor, y: torch.Tensor, device: str) -> list[dict]:
    return execute_unit(unit, _model(unit.ckpt_path, device), x, y, device)


def _run_pool(units, x_all, y_all, start, *, workers, threads, device):
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    window = 2 * workers  # bounded number of units in flight (memory stays flat on huge grids)
    pending: dict = {}
    todo = iter(units)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        try:
            while True:
                while len(pending) < window:
                    unit = next(todo, None)
                    if unit is None:
                        break
                    x, y = _payload(unit, x_all, y_all, start)
                    pending[pool.submit(_pool_task, unit, x, y, device)] = unit
                if not pending:
                    break
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    unit = pending.pop(fut)
                    try:
                        rows = fut.result()
                    except Exception as exc:
                        raise _unit_failed(unit, exc) from exc
                    yield unit, rows
        finally:
            for fut in pending:
                fut.cancel()


# --------------------------------------------------------------------------- Ray backend

def _ray_task(unit: Unit, x: torch.Tensor, y: torch.Tensor, device: str, threads: int, model) -> list[dict]:
    torch.set_num_threads(threads)
    return execute_unit(unit, model, x, y, device)


def ray_init(workers: int, address: str | None = None) -> bool:
    """Connect to Ray (``address`` or $RAY_ADDRESS), or start a private local one bound to 127.0.0.1.

    Returns True when this call started Ray (the caller shuts it down)."""
    try:
        import ray
    except ImportError:
        raise CertattrError("the ray backend needs Ray: pip install 'certattr[ray]'") from None
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
    return True


def _run_ray(units, x_all, y_all, start, *, workers, threads, device, checkpoints, address):
    import ray

    from .. import checkpoint

    started = ray_init(workers, address)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(_ray_task)
        models = {sha: ray.put(checkpoint.load(path)) for sha, path in checkpoints.items()}
        window = 2 * max(workers, int(ray.cluster_resources().get("CPU", workers)))
        pending: dict = {}
        todo = iter(units)
        while True:
            while len(pending) < window:
                unit = next(todo, None)
                if unit is None:
                    break
                x, y = _payload(unit, x_all, y_all, start)
                pending[task.remote(unit, x, y, device, threads, models[unit.ckpt])] = unit
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                unit = pending.pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as exc:
                    for other in pending:
                        ray.cancel(other)
                    raise _unit_failed(unit, exc) from exc
                yield unit, rows
    finally:
        if started:
            ray.shutdown()


def describe(spec: CampaignSpec) -> dict[str, Any]:
    """A short summary of the grid (for dry runs and logs)."""
    return {
        "checkpoints": len(spec.checkpoints), "samples": spec.n, "attributions": spec.attributions,
        "norms": {nm: spec.eps[nm] for nm in spec.norms},
        "attacks": [f"{m.label} x{m.restarts}" for m in spec.attacks], "bounds": [m.label for m in spec.bounds],
        "rows": total_rows(spec),
    }
