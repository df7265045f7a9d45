"""Fault tolerance within a run: torchft's replica groups behind the engine interface.

A run is `replica_groups` groups of ranks. Inside a group the engine is the usual one (single, ddp, or
fsdp: then the run is HSDP, sharded inside a group and replicated across groups); across groups,
torchft's Manager votes a quorum at every step (through its lighthouse) and the gradients are averaged
over the groups in that quorum. A group that dies is left out of the next quorum and the others go on
at once; a group that (re)starts votes in a quorum before it reads any checkpoint and, when live peers
are ahead of it, recovers the weights, optimiser, schedule, step and data position from a healthy
peer's memory (torchft's HTTP transport) instead. After a full restart (no peer ahead) each group
resumes from its own checkpoint.

HSDP: rank r of every group holds the same shard of every parameter (the groups have the same size,
which live recovery checks), so the local shards of the gradients are averaged across groups as they
are (torchft's cross-group process group pairs equal group ranks), and live recovery sends each rank's
local shards, never a DTensor or its mesh.

Exact data. Each group's ranks take slots `group_slot * group_size + rank` of `participants *
group_size` in the global epoch plan (`data_pipeline/stream/plan.py`), whose saved position is world-size
independent. A step is either committed by the quorum (every participant's gradient is in the average:
every participant's samples are consumed) or not (no update anywhere: every group rewinds its data to the
step boundary, and the samples are shared out again in the next step's layout). So no sample is lost or
taken twice within an epoch however groups leave and join. The data position rides along in live recovery.

The step's batch is `participants x` the group's batch: a step with fewer groups trains on fewer samples
(the gradient is their mean), the learning-rate schedule stays a function of the step.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..config import ConfigError, TorchFTOptions
from .base import Engine

log = logging.getLogger("pretrain")

REPLICA_GROUP_ENV = "REPLICA_GROUP_ID"  # set by cluster.launch --replica-group
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # http://host:port of the lighthouse (cluster.launch sets it)


class LighthouseLost(ConfigError):
    """The quorum could not be reached (lighthouse gone): one line, the run stops; resume from the checkpoint."""


class FaultTolerance:
    """Mixed into an engine class (single, ddp or fsdp): the cross-group reduction, the commit decision and
    the live-recovery state. The trainer calls `recover_live` before it would read a checkpoint, `begin_step`
    before a step's first batch, and reads `committed` after `step`/`skip_step`."""

    committed = True

    def _setup_ft(self, options: TorchFTOptions, loader: Any) -> None:
        os.environ.setdefault("RUST_LOG", "warn")  # torchft's own server logs every quorum and commit at info
        from torchft import Manager, ProcessGroupGloo  # imported only when asked for

        for name in ("torchft", "torchft_quorums", "torchft_commits"):  # warnings and errors still show
            logging.getLogger(name).setLevel(logging.WARNING)

        self.ft = options
        self.loader = loader
        self.group = int(os.environ.get(REPLICA_GROUP_ENV, "0"))
        lighthouse = options.lighthouse or os.environ.get(LIGHTHOUSE_ENV, "")
        if not lighthouse:
            raise ConfigError(f"engine.fault_tolerance=torchft needs a lighthouse: set engine.torchft.lighthouse "
                              f"or ${LIGHTHOUSE_ENV} (python -m cluster.launch --torchft-lighthouse starts one)")
        group_rank, group_size = self.dist.rank, self.dist.world_size
        store_addr, store_port = self._group_store()
        if self.device.type == "cuda":
            from torchft import ProcessGroupNCCL
            pg = ProcessGroupNCCL(timeout=timedelta(seconds=options.timeout_s))
        else:
            pg = ProcessGroupGloo(timeout=timedelta(seconds=options.timeout_s))
        self.manager = Manager(
            pg=pg, load_state_dict=None, state_dict=None, min_replica_size=options.min_replicas,
            # The quorum is known before the step's data is drawn: the data layout depends on it.
            use_async_quorum=False,
            # Every group builds the same initial weights (the trainer seeds them), so step 0 needs no copy;
            # a quorum at step 0 then heals no one, and `recover_live` can tell "behind live peers" apart.
            init_sync=False,
            timeout=timedelta(seconds=options.timeout_s), quorum_timeout=timedelta(seconds=options.quorum_timeout_s),
            connect_timeout=timedelta(seconds=options.timeout_s),
            rank=group_rank, world_size=group_size, store_addr=store_addr, store_port=store_port,
            lighthouse_addr=lighthouse, replica_id=f"replica_{self.group}", hostname=socket.gethostname())
        self.manager.register_state_dict_fn("trainer", self._load_live_state, self._live_state)
        self.healed_step: int | None = None
        self._voted: int | None = None  # the step whose quorum `recover_live` already voted
        self._layout: tuple[int, int] | None = None
        self.participants = 0

    def _group_store(self) -> tuple[str, int]:
        """The TCPStore of this replica group: torchrun's (MASTER_ADDR/PORT) or, for a group of one process
        started without a launcher, one this process hosts."""
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        if self.dist.world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
            return addr, int(os.environ["MASTER_PORT"])
        self._store = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False)
        return addr, self._store.port

    # ---- live recovery: what a healthy peer sends a replica group that joins ------------------
    def _live_state(self) -> dict[str, Any]:
        return {"engine": self._engine_state(), "scheduler": self.scheduler.state_dict(),
                "data": self.loader.position(), "step": self.manager.current_step()}

    def _load_live_state(self, state: dict[str, Any]) -> None:
        self._load_engine_state(state["engine"])
        self.load_scheduler_state(state["scheduler"])
        self.loader.load_position(state["data"])
        self._layout = None  # the data layout is set again from the quorum
        self.healed_step = int(state["step"])

    def _engine_state(self) -> dict[str, Any]:
        """Weights and optimiser state as plain tensors: under fsdp this rank's local shards."""
        if not self.shards_weights:
            return {"model": self._module.state_dict(), "optimizer": self.optimizer.state_dict()}
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"group_size": self.dist.world_size, "model": local_shards(model), "optimizer": local_shards(optim)}

    def _load_engine_state(self, state: dict[str, Any]) -> None:
        if not self.shards_weights:
            self._module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            return
        if state["group_size"] != self.dist.world_size:
            raise ConfigError(f"replica group {self.group} has {self.dist.world_size} ranks, the peer it recovers "
                              f"from {state['group_size']}: under engine.kind=fsdp every replica group needs the "
                              "same number of ranks (start it with that many)")
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        model, optim = get_state_dict(self.model, self.optimizer)  # DTensors on this group's mesh (state initialised)
        set_state_dict(self.model, self.optimizer, model_state_dict=into_shards(model, state["model"]),
                       optim_state_dict=into_shards(optim, state["optimizer"]))

    def recover_live(self) -> int | None:
        """Before any checkpoint is read: vote this group's first quorum at step 0. Live peers ahead of it
        make it heal from one of them: returns their step (the caller reads no checkpoint, unless its own
        is newer still). Otherwise None: it resumes from its own checkpoint, and the quorum just voted
        serves its first step if that is still step 0. (A group without a checkpoint in the same first
        quorum as one with a checkpoint fails that first step on its collective timeout, then recovers from
        the other: a rare start-up race.)"""
        self._vote(0)
        self._voted = self.manager.current_step()
        healed, self.healed_step = self.healed_step, None
        return healed or None

    # ---- the step ----------------------------------------------------------------------------
    def begin_step(self, step: int) -> int:
        """Vote the quorum for the step after `step` (recovering from a peer if this group is behind)
        and lay the data out over the groups in it. Returns the step the run is at (a peer's, after
        a live recovery)."""
        voted, self._voted = self._voted, None
        if not voted == step == self.manager.current_step():  # else `recover_live` voted this step's quorum
            self._vote(step)
        if self.healed_step is not None:
            log.warning("replica group %d recovered live from a peer at step %d", self.group, self.healed_step)
            step, self.healed_step = self.healed_step, None
        slot, self.participants = self.manager.participating_rank(), self.manager.num_participants()
        layout = ((slot or 0) * self.dist.world_size + self.dist.rank, max(1, self.participants) * self.dist.world_size)
        if layout != self._layout:
            if self._layout is not None:
                log.warning("replica groups in the quorum: %d (was %d); this group is slot %s", self.participants,
                            self._layout[1] // self.dist.world_size, slot)
            self.loader.restart(*layout)
            self._layout = layout
        self.committed = True
        return step

    def _vote(self, step: int) -> None:
        if self.manager.current_step() != step:  # a resumed checkpoint: the quorum starts from its step
            self.manager.load_state_dict({"step": step, "batches_committed": self.manager.batches_committed()})
        try:
            self.manager.start_quorum()  # a live recovery's state is loaded in here
        except ConfigError:  # a peer's state that does not fit this group: its own line
            raise
        except Exception as e:  # noqa: BLE001 -- the RPC's error text is long: keep its first line
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LighthouseLost(f"torchft quorum failed at step {step + 1} (lighthouse "
                                 f"{self.ft.lighthouse or os.environ.get(LIGHTHOUSE_ENV)} unreachable?): {text}; "
                                 "restart the lighthouse and the run resumes from its last checkpoint") from None

    def _reduce_across_groups(self, bad: bool) -> bool:
        """Average the gradients over the groups in the quorum (one flat buffer, one all-reduce); the
        last entry carries this group's bad-loss flag, so a bad loss anywhere skips the step everywhere.
        Under fsdp each rank sends its local shards (rank r of every group holds the same ones).
        Returns whether the step is committed and good."""
        params = [p for p in self._module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None and not bad else torch.zeros_like(p) for p in params]
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        flat = torch.cat([g.reshape(-1).float() for g in local] + [torch.full((1,), float(bad), device=self.device)])
        self.manager.allreduce(flat).wait()
        self.committed = self.manager.should_commit()
        if not self.committed or flat[-1].item() > 0:
            return False
        offset = 0
        for p, g, shard in zip(params, grads, local):
            n = shard.numel()
            if p.grad is None:
                p.grad = g
            shard.copy_(flat[offset:offset + n].view_as(shard))
            offset += n
        return True

    def step(self) -> torch.Tensor:
        if not self._reduce_across_groups(bad=False):
            self._drop_step()
            return torch.zeros(())
        return super().step()

    def skip_step(self) -> None:
        self._reduce_across_groups(bad=True)
        self._drop_step()

    def _drop_step(self) -> None:
        if self.committed:  # a bad loss somewhere: skipped in every group, the schedule advances
            super().skip_step()
        else:  # not committed: the step never happened (the trainer rewinds the data)
            self.optimizer.zero_grad(set_to_none=True)
            self._micro = 0

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "replica_group": self.group}

    def close(self) -> None:
        self.manager.shutdown(wait=False)


def local_shards(tree: Any) -> Any:
    """`tree` with every DTensor replaced by this rank's local shard (what live recovery sends)."""
    if isinstance(tree, DTensor):
        return tree.to_local()
    if isinstance(tree, dict):
        return {k: local_shards(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [local_shards(v) for v in tree]
    return tree


def into_shards(template: Any, received: Any) -> Any:
    """`received` (local shards, as `local_shards` sent them) as DTensors laid out like `template`'s."""
    if isinstance(template, DTensor):
        if tuple(received.shape) != tuple(template.to_local().shape):
            raise ConfigError(f"live recovery: a shard of shape {tuple(received.shape)} does not fit this rank's "
                              f"{tuple(template.to_local().shape)}; every replica group needs the same number of ranks")
        return DTensor.from_local(received.to(template.device, template.dtype), template.device_mesh,
                                  template.placements, run_check=False, shape=template.shape, stride=template.stride())
    if isinstance(template, dict) and isinstance(received, dict):
        return {k: into_shards(template[k], v) if k in template else v for k, v in received.items()}
    if isinstance(template, list) and isinstance(received, list) and len(template) == len(received):
        return [into_shards(t, v) for t, v in zip(template, received)]
    return received


def fault_tolerant(engine_cls: type[Engine]) -> type[Engine]:
    """`engine_cls` with torchft's replica groups mixed in."""
    return type(f"FaultTolerant{engine_cls.__name__}", (FaultTolerance, engine_cls), {})
