#!/usr/bin/env python3
"""Die of SIGKILL sent to itself."""

import os
import signal

os.kill(os.getpid(), signal.SIGKILL)
