"""Refiner-ViT command line: ``python cli.py fit --config configs/quickstart.yaml``.

Subcommands: fit, validate, test, predict. ``python cli.py fit --help`` lists every option.
"""

from refiner_pl.cli import main

if __name__ == "__main__":
    main()
