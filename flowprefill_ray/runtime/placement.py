"""Creating the worker actors where ``PlacementConfig`` says.

Without a strategy every actor is placed by Ray on its own (resources permitting). With one, a
placement group of one bundle per worker is reserved first (prefill bundles, then decode
bundles), so e.g. ``SPREAD`` puts workers on different nodes and ``STRICT_PACK`` on one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .config import RuntimeConfig
from .decode_worker import RemoteDecodeWorker, RemoteDecodeWorkerRDT
from .prefill_worker import PREFILL_WORKER_CONCURRENCY, RemotePrefillWorker, RemotePrefillWorkerRDT

# Zero-copy reads of torch tensors from the object store (the KV hand-off path).
WORKER_ENV = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def niceness_env(config: RuntimeConfig) -> dict[str, str]:
    """The env var that sets an actor's process niceness (``placement.worker_niceness``),
    read by Ray's core worker when the process starts."""
    return {"RAY_worker_niceness": str(config.placement.worker_niceness)}


@dataclass
class Workers:
    """Handles of the created workers, by worker id, and the placement group if any."""

    prefill: dict[str, object] = field(default_factory=dict)
    decode: dict[str, object] = field(default_factory=dict)
    group: PlacementGroup | None = None
    # KV pool of each decode worker, blocks (``decode.kv_blocks: auto`` sizes it per GPU).
    decode_kv_blocks: dict[str, int] = field(default_factory=dict)

    def all_handles(self) -> list:
        return [*self.prefill.values(), *self.decode.values()]


def _bundle(num_cpus: float, num_gpus: float) -> dict[str, float]:
    bundle = {"CPU": num_cpus}
    if num_gpus:
        bundle["GPU"] = num_gpus
    # Ray refuses an empty bundle; a token CPU share keeps a zero-CPU worker placeable.
    if not any(bundle.values()):
        bundle["CPU"] = 0.01
    return bundle


def create_workers(config: RuntimeConfig, ready_timeout_s: float = 300.0) -> Workers:
    """Create every prefill and decode worker and wait until each has loaded its model.

    Raises ``TimeoutError`` naming the placement if the cluster cannot place them in time.
    """
    placement = config.placement
    workers = Workers()
    bundles = [
        _bundle(placement.prefill_num_cpus, placement.prefill_num_gpus)
    ] * placement.num_prefill_workers
    bundles += [
        _bundle(placement.decode_num_cpus, placement.decode_num_gpus)
    ] * placement.num_decode_workers
    if placement.strategy is not None:
        workers.group = placement_group(bundles, strategy=placement.strategy)
        if not _wait(workers.group.ready(), ready_timeout_s):
            remove_placement_group(workers.group)
            raise TimeoutError(
                f"placement group {bundles} with strategy {placement.strategy} could not be "
                f"placed within {ready_timeout_s:.0f} s; check the cluster's resources"
            )

    def options(index: int, num_cpus: float, num_gpus: float, name: str) -> dict:
        opts = dict(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            name=name,
            namespace=config.namespace,
            runtime_env={"env_vars": {**WORKER_ENV, **niceness_env(config)}},
            # A dead worker process is restarted (it reloads the model); its in-flight calls
            # fail rather than re-run, because the scheduler re-queues prefill work itself.
            max_restarts=config.faults.worker_max_restarts,
            max_task_retries=0,
        )
        if workers.group is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=workers.group, placement_group_bundle_index=index
            )
        return opts

    direct = config.kv_transfer.mode != "object_store"
    prefill_class = RemotePrefillWorkerRDT if direct else RemotePrefillWorker
    decode_class = RemoteDecodeWorkerRDT if direct else RemoteDecodeWorker
    for i in range(placement.num_prefill_workers):
        wid = f"prefill-{i}"
        workers.prefill[wid] = prefill_class.options(
            max_concurrency=PREFILL_WORKER_CONCURRENCY,
            **options(
                i,
                placement.prefill_num_cpus,
                placement.prefill_num_gpus,
                f"{config.name_prefix}-{wid}",
            ),
        ).remote(wid, config.model, config.prefill, config.policy.long_chunk_tokens)
    for j in range(placement.num_decode_workers):
        wid = f"decode-{j}"
        index = placement.num_prefill_workers + j
        workers.decode[wid] = decode_class.options(
            **options(
                index,
                placement.decode_num_cpus,
                placement.decode_num_gpus,
                f"{config.name_prefix}-{wid}",
            ),
        ).remote(wid, config.model, config.decode)
    refs = [handle.info.remote() for handle in workers.all_handles()]
    if not _wait(refs, ready_timeout_s):
        destroy_workers(workers)
        raise TimeoutError(
            f"{len(refs)} workers did not load the model within {ready_timeout_s:.0f} s "
            f"(placement {placement.model_dump()})"
        )
    infos = ray.get(refs)  # re-raises a worker's constructor error, e.g. a bad checkpoint
    workers.decode_kv_blocks = {
        info["worker_id"]: info["kv_blocks"]
        for info in infos
        if info["worker_id"] in workers.decode
    }
    return workers


def destroy_workers(workers: Workers) -> None:
    for handle in workers.all_handles():
        ray.kill(handle, no_restart=True)
    if workers.group is not None:
        remove_placement_group(workers.group)
        workers.group = None


def _wait(refs, timeout_s: float) -> bool:
    refs = refs if isinstance(refs, list) else [refs]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    return len(ready) == len(refs)
