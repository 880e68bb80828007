"""`python -m llava_serve.worker`: the model worker (same as `python -m llava_serve.model_worker`)."""

import sys

from llava_serve.worker.main import main

if __name__ == "__main__":
    sys.exit(main())
