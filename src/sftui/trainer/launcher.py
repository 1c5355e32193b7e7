"""One machine's launcher of a multi-node attempt: ``python -m sftui.trainer.launcher ARGS`` is
``accelerate launch ARGS`` that dies with the process that started it.

The supervisor (machine 0) or ``sftui node`` (the others) starts it. If that parent dies, even by
SIGKILL, the launcher gets SIGKILL (PR_SET_PDEATHSIG, set before accelerate starts anything), and
its ranks, which set the same signal against their own parent, follow. The ranks check that
parent against ``SFTUI_SUPERVISOR_PID``, so from here on it names this process.
"""

from __future__ import annotations

import os
import sys

from sftui.trainer.lifeline import die_with_parent


def main() -> None:
    die_with_parent()
    os.environ["SFTUI_SUPERVISOR_PID"] = str(os.getpid())
    os.environ["SFTUI_VIA_LAUNCHER"] = "1"  # its ranks die with it (no lifeline: see trainer/__main__)
    from accelerate.commands.launch import main as accelerate_launch

    sys.argv = ["accelerate launch", *sys.argv[1:]]
    accelerate_launch()


if __name__ == "__main__":
    main()
