import os
import sys
from pathlib import Path

# tests/helpers.py is imported as a plain module by the tests.
sys.path.insert(0, str(Path(__file__).parent))
# The tests run this checkout's fedberry, and so do the processes they start (which inherit the
# environment), whatever fedberry the interpreter has installed: a second work tree tests itself.
_SRC = str(Path(__file__).resolve().parent.parent / "src")
sys.path.insert(0, _SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_SRC] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _SRC])
