#!/usr/bin/env python3
"""Print, as JSON, every environment variable whose name starts with TASKD_."""

import json
import os

print(json.dumps({k: v for k, v in os.environ.items() if k.startswith("TASKD_")}))
