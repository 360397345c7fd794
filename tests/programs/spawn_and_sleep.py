#!/usr/bin/env python3
"""Start a grandchild that sleeps, write "<own pid> <grandchild pid>" to argv[1], then sleep.

The grandchild stays in this process's group with its stdio on /dev/null, so only
killing the whole process group ends it.
"""

import os
import subprocess
import sys
import time

grandchild = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(300)"],
    stdin=subprocess.DEVNULL,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
)
path = sys.argv[1]
with open(path + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {grandchild.pid}")
os.replace(path + ".tmp", path)  # atomic: the test never reads a half-written file
time.sleep(300)
