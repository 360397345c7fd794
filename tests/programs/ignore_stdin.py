#!/usr/bin/env python3
"""Close stdin unread, print "ok" and exit: the writer of stdin gets a broken pipe."""

import os

os.close(0)
print("ok")
