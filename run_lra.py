#!/usr/bin/env python
"""Entry point: ``python run_lra.py --task listops --model transformer --norm dtn`` (see --help)."""
from lra_dtn.app.cli import main

if __name__ == "__main__":
    main()
