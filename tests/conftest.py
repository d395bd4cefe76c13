"""The tests under tests/ run from the repository root's modules; this puts the root on the import path."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
