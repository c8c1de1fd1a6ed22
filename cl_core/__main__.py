import sys

from cl_core.cli import main

if __name__ == "__main__":  # vLLM starts processes that re-import the main module
    sys.exit(main())
