import os
import sys

# kernels read TRITON_INTERPRET at import time; set before anything imports them (no GPU here)
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
