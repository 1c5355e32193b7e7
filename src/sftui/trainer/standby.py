"""A rank started before its attempt: ``python -m sftui.trainer.standby RUN_DIR``.

Between a rank's ``oom`` event and the next attempt's first step, most of the time went to
starting Python and importing torch, accelerate and transformers: 5.2 of 8.4 s for ``tiny`` on a
CPU, about 6 s of 24.5 s on two H200s (docs/BENCHMARKS.md). So the supervisor starts the next
attempt's ranks this way while the current one loads and trains (``launch.start_standby``): each
imports what a rank of this run will import and then waits, using no CPU, for one line on stdin,
``{"port": MASTER_PORT}``, sent when its attempt starts (``launch.start_attempt``). From there
on it is that attempt's rank exactly as ``python -m sftui.trainer RUN_DIR`` would be: it was
started with the attempt's whole environment but the rendezvous port, which is only chosen then.

Nothing here may touch a GPU (the attempt before it still holds the memory) or write to the run:
a standby that is never used leaves no trace. It leaves when stdin closes, which is also what
happens when its supervisor dies.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def warm(run_path: Path) -> None:
    """Imports what a rank of this run imports on its way to the first step: the worker (torch,
    accelerate, transformers' base), the tokenizer and model classes the run loads, peft for
    LoRA and torch's compiler for ``--compile``. Anything that fails here is left for the rank
    to meet and report in its own words."""
    from sftui.runfile import RunFile
    from sftui.rundir import RunDir
    from sftui.trainer import loop  # noqa: F401 - the import is the point

    cfg = RunFile.read(RunDir(run_path)).cfg
    if cfg.lora:
        import peft  # noqa: F401
    if cfg.compile:
        import torch._inductor.compile_fx  # noqa: F401
    from sftui.trainer import model

    if model.is_preset(cfg.model):
        from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, T5ForConditionalGeneration  # noqa: F401
        return
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    model.auto_class(config)._model_mapping[type(config)]  # imports the model's module (transformers' lazy mapping)


def main() -> None:
    if len(sys.argv) != 2:
        print("usage: python -m sftui.trainer.standby RUN_DIR", file=sys.stderr)
        sys.exit(2)
    os.umask(0o077)  # as the rank sets it, before the imports create anything (inductor's cache directory)
    try:
        warm(Path(sys.argv[1]))
    except Exception:  # noqa: BLE001 - see warm
        pass
    order = sys.stdin.readline()
    if not order:  # not needed after all, or the supervisor is gone
        os._exit(0)
    os.environ["MASTER_PORT"] = str(json.loads(order)["port"])
    from sftui.trainer.__main__ import main as rank_main

    rank_main()


if __name__ == "__main__":
    main()
