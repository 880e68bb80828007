import sys

from llava_serve.cli import main

sys.exit(main())
