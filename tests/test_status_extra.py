"""Without the status extra: the core imports no prometheus_client, and asking for a status
server is refused with the sentence that says what to install (numpy-only Pythons run this)."""

import subprocess
import sys

CODE = """
import sys
sys.modules["prometheus_client"] = None  # as if it were not installed
import fedberry
assert not any(m.startswith("prometheus_client") for m, v in sys.modules.items() if v), "loaded"
try:
    fedberry.serve("127.0.0.1:0", status="127.0.0.1:0")
except ValueError as exc:
    print(exc)
"""


def test_without_the_extra_status_is_refused_with_what_to_install() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("--status needs prometheus_client, which is not installed: "
                                  "pip install 'fedberry[status]'")
