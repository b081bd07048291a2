"""The table the demos print as rounds close: one row per ``metrics.jsonl`` record.

Shared by the torch and Keras demos (``torch_demo.run_demo``), ``fedberry chief`` and the MPI
demo, so that every way of running a federation reads the same.
"""

from __future__ import annotations

from typing import Any

TABLE_HEADER = (f"{'round':>5} {'workers':>7} {'test_acc':>8} {'test_loss':>9} {'train_loss':>10} "
                f"{'up_KiB':>9} {'down_KiB':>9} {'wall_s':>7}")


def format_row(r: dict[str, Any]) -> str:
    """One round's record (``round``, ``workers``, ``bytes_up``, ``bytes_down``, ``wall_s`` and
    the optional losses and accuracy, shown as ``-`` when absent) as a row under TABLE_HEADER."""
    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    return (f"{r['round']:>5} {r['workers']:>7} {num(r.get('test_accuracy'), '8.4f')} "
            f"{num(r.get('test_loss'), '9.4f')} {num(r.get('train_loss'), '10.4f')} "
            f"{r['bytes_up'] / 1024:>9.1f} {r['bytes_down'] / 1024:>9.1f} {r['wall_s']:>7.1f}")
