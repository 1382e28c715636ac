"""`python -m densa ...` is the same as `densa ...`."""

import sys

from densa.cli import main

sys.exit(main())
