#!/usr/bin/env python3
"""Write argv[1] bytes of 'a' to stdout (to overflow the captured stdout)."""

import sys

remaining = int(sys.argv[1])
block = b"a" * 65536
while remaining > 0:
    sys.stdout.buffer.write(block[:remaining])
    remaining -= len(block)
