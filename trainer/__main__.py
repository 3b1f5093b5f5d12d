"""``python -m trainer``: ``sluice train`` without the rest of the CLI (torchrun, tests)."""

from trainer.cli import train

if __name__ == "__main__":
    train.main(prog_name="python -m trainer")
