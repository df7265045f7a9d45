"""Test driver (under torchrun, or plain python for one rank): build the run from `pretrain/main.py`'s
arguments, resume from its newest checkpoint and save that same step again at once, without a
training step in between. The re-saved checkpoint holds exactly what this world size / engine
layout took from the saved one, written by the engine's own save -- what resharding tests compare.

  torchrun --nproc_per_node 3 tests/drivers/resave_checkpoint.py --config ... run.dir=... [overrides]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.config import load_config  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402


def main() -> None:
    assert sys.argv[1] == "--config", "usage: resave_checkpoint.py --config FILE [overrides]"
    trainer = Trainer(load_config(sys.argv[2], sys.argv[3:]), config_source=sys.argv[2])
    try:
        trainer.resume()
        assert trainer.step > 0, "no checkpoint to resume from"
        trainer.save_and_evaluate(evaluate=False)
        trainer.checkpointer.wait()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
