#!/usr/bin/env python3
"""Print, as JSON, the whole environment this program was started with.

Read from /proc, not os.environ: without a UTF-8 locale Python adds LC_CTYPE to its own
os.environ at start (PEP 538), and the tests check exactly what taskd gave the program.
"""

import json
from pathlib import Path

entries = Path("/proc/self/environ").read_bytes().split(b"\0")
pairs = (entry.decode().split("=", 1) for entry in entries if entry)
print(json.dumps(dict(pairs)))
