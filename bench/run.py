#!/usr/bin/env python3
"""The one benchmark command: `python3 bench/run.py [--quick] [--only ...] [--workloads ...]
[--far-ms MS]`.

Runs fbmount, s3fs and rclone mount against a private SeaweedFS on 127.0.0.1 and writes a
table (stdout and --out), JSON and a PNG chart.  With --far-ms each mount talks to the
server through bench/farlink.py, which adds MS ms each way.  See README.md, "Benchmark".
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.runner import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
