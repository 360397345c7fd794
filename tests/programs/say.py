#!/usr/bin/env python3
"""Print the arguments as one line of plain text; print nothing when there are none."""

import sys

if len(sys.argv) > 1:
    print(" ".join(sys.argv[1:]))
