import os
import sys

if os.environ.get("LEDMERGE_WORKER"):  # a local workflow run's warm worker (ledmerge/worker.py)
    from .worker import run_via_worker

    code = run_via_worker(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)

from .cli import main

raise SystemExit(main())
