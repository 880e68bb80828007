"""`python -m llava_serve.model_worker`: the model worker, with the seed's flags and defaults."""

import sys

from llava_serve.worker.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
