"""The process group of a single-node attempt, reachable from this machine only.

torch's ``env://`` rendezvous makes rank 0 host its TCPStore on every interface (``[::]:PORT``),
and gloo and NCCL pick the interface their hostname resolves to: on a shared server, anyone on
the network could reach a run's store. When the sftui supervisor started this rank (one node,
``MASTER_ADDR=127.0.0.1``), rank 0 binds the store to 127.0.0.1 itself and the collectives use
the loopback interface (unless the user chose one), so nothing of a run listens beyond loopback
(DESIGN.md "Processes"). accelerate then finds the group initialised and uses it as it is.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

LOOPBACK = "127.0.0.1"


def launched_single_node() -> bool:
    """This rank was started by sftui's supervisor on one node (not torchrun / accelerate launch)."""
    env = os.environ
    return (bool(env.get("SFTUI_SUPERVISOR_PID")) and env.get("MASTER_ADDR") == LOOPBACK
            and env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and "WORLD_SIZE" in env)


def init_loopback_group(cuda: bool, timeout: timedelta) -> bool:
    """Initialise the default process group on a loopback-only store; False when this rank was
    not started by the supervisor on one node (then accelerate rendezvouses as usual)."""
    import torch.distributed as dist

    if not launched_single_node() or dist.is_initialized():
        return False
    env = os.environ
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    env.setdefault("NCCL_SOCKET_IFNAME", "lo")
    rank, world, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
    if rank == 0:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, port))
        listener.listen(128)
        store = dist.TCPStore(LOOPBACK, port, world, True, timeout=timeout, multi_tenant=True,
                              master_listen_fd=listener.detach())
    else:
        store = dist.TCPStore(LOOPBACK, port, world, False, timeout=timeout)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return True
