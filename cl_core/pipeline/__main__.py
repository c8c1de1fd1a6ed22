"""`python -m cl_core.pipeline <command>`: see cl_core/pipeline/cli.py (e.g. `gate`, the CI promotion gate)."""

import sys

from cl_core.pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
