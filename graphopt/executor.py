"""One way to run independent evaluations: here, one after another, or on a Ray cluster.

The sensitivity analysis and the accuracy-budget search (graphopt/accuracy.py) evaluate many
candidate models that do not depend on each other. `Executor.map(fn, shared, items)` returns
`[fn(shared, item) for item in items]` in order, whichever way it runs, so a Ray run decides
exactly what a serial run decides. `shared` is what every call reads (a model, its data): Ray
puts it in its object store once instead of shipping it with each call.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from graphopt.errors import GraphoptError


class Executor:
    """Runs `fn(shared, item)` for every item, here and in order."""

    name = "serial"
    workers = 1

    def map(self, fn: Callable[[Any, Any], Any], shared: Any, items: Sequence[Any]) -> list:
        return [fn(shared, item) for item in items]

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RayExecutor(Executor):
    """The same map on Ray: one remote task per item, results gathered in submission order."""

    name = "ray"

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise GraphoptError("--ray needs Ray: pip install 'graphopt[distributed]'") from None
        self._ray = ray
        # Started here, stopped here; a runtime someone else started is theirs to stop.
        self._owns = not ray.is_initialized()
        if self._owns:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
            if address not in (None, "local"):
                kwargs["address"] = address
            elif num_cpus is not None:
                kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except Exception as exc:  # ConnectionError, RuntimeError, ValueError: all "no cluster there"
                from graphopt.errors import one_line

                raise GraphoptError(f"cannot start or reach Ray at {address or 'a local instance'}: {one_line(exc)}") from None
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._remotes: dict[Callable, Any] = {}

    def map(self, fn, shared, items):
        if not items:
            return []
        ray = self._ray
        remote = self._remotes.get(fn)
        if remote is None:
            remote = self._remotes[fn] = ray.remote(num_cpus=1)(fn)
        shared_ref = ray.put(shared)
        return ray.get([remote.remote(shared_ref, item) for item in items])

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns = False


def create(ray_address: str | None = None) -> Executor:
    """The serial executor, or Ray at `ray_address` ("auto": a running cluster; "local": start one here)."""
    return Executor() if not ray_address else RayExecutor(ray_address)
