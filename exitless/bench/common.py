"""Shared benchmark plumbing: guest JSON results, CPU accounting, tables and JSON output."""
from __future__ import annotations

from ..errors import ExitlessError
import json
import resource
from pathlib import Path

from rich.console import Console
from rich.table import Table


class BenchError(ExitlessError, RuntimeError):
    pass


def guest_result(console_bytes: bytes, app: str) -> dict:
    """The one JSON line the guest kit prints, starting with {"app": ...}."""
    for line in reversed(console_bytes.decode(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith('{"app":'):
            result = json.loads(line)
            if result.get("app") != app:
                raise BenchError(f"expected a {app} result, got {result.get('app')}")
            return result
    tail = console_bytes.decode(errors="replace")[-800:]
    raise BenchError(f"the guest printed no {app} result; its console ended with:\n{tail}")


def process_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def print_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> None:
    table = Table(title=title)
    for _, header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*(_fmt(row.get(key)) for key, _ in columns))
    Console(width=max(160, Console().width)).print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_json(rows: list[dict], path: str | None) -> None:
    text = json.dumps(rows, indent=2)
    if path in (None, "-"):
        print(text)
    else:
        Path(path).write_text(text + "\n")
