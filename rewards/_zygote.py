"""The grading pool's zygote: a single-threaded process that loads the reward functions once and
forks warm grading workers on request. Started by `rewards.pool.GradingPool`, never by users.

Why not ``multiprocessing``: its ``spawn`` and ``forkserver`` children re-run the owner's
``__main__`` script (under Ray that is Ray's worker script) and start cold, and ``fork`` from a
threaded server process can deadlock. The zygote is started with ``python -m`` and a clean
environment, imports and warms math-verify (~1 s, once), and each fork from it is ready in
milliseconds, which keeps the replacement of a killed worker cheap.

Protocol on the control socket (AF_UNIX, SOCK_SEQPACKET): the zygote sends ``b"R"`` when ready;
each ``b"S"`` from the owner is answered with the new worker's pid (4 bytes, network order)
and, as SCM_RIGHTS ancillary data, the owner's end of a socket pair connected to that worker.
The worker speaks `multiprocessing.connection.Connection` framing on it (see
`rewards.pool.worker_loop`). When the owner closes the control socket (or dies) the zygote
exits, and every worker dies with it (PR_SET_PDEATHSIG), even one stuck in a computation.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import struct
import sys


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the zygote) exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the lifeline is the socket
        pass


def main(argv: list[str]) -> None:
    ctl = socket.socket(fileno=int(argv[0]))
    config = json.loads(argv[1])
    # The owner handles Ctrl-C; children are reaped automatically (the owner watches their
    # sockets for EOF instead of their exit status).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)

    # imported after the signal set-up: a Ctrl-C during the slow math-verify import must not kill the zygote
    from rewards import registry
    from rewards.pool import warm_up, worker_loop

    registry.register_user_functions(config["user_functions"], config["fn"])
    warm_up()
    zygote_pid = os.getpid()
    ctl.sendall(b"R")
    while True:
        try:
            cmd = ctl.recv(16)
        except OSError:
            cmd = b""
        if not cmd:
            os._exit(0)  # the owner is gone
        if cmd != b"S":
            continue
        owner_end, worker_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                ctl.close()
                owner_end.close()
                _die_with_parent()
                if os.getppid() != zygote_pid:  # the zygote died before prctl took effect
                    os._exit(0)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                worker_loop(worker_end.detach(), config["format_weight"], config["memory_limit_mb"])
            finally:
                os._exit(0)
        worker_end.close()
        try:
            socket.send_fds(ctl, [struct.pack("!i", pid)], [owner_end.fileno()])
        except OSError:
            os._exit(0)
        finally:
            owner_end.close()


if __name__ == "__main__":
    main(sys.argv[1:])
