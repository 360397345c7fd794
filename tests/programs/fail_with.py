#!/usr/bin/env python3
"""Write 10 000 bytes of noise then a last line to stderr, and exit with status argv[1]."""

import sys

sys.stderr.write("noise " * 2000 + "\n")
sys.stderr.write("the real reason\n")
sys.exit(int(sys.argv[1]))
