"""`python -m serving ...` is the `jaxllm` command."""

import sys

from serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
