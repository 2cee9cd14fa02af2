"""The report: one ``Check`` per line, the statuses a line can have, and the table they are
printed as."""
from __future__ import annotations

import dataclasses
import sys

PASS, FAIL, WARN, NA, INFO = "pass", "FAIL", "warn", "n/a", "info"


@dataclasses.dataclass
class Check:
    """One line of the report."""

    section: str
    name: str
    status: str
    detail: str
    data: dict = dataclasses.field(default_factory=dict)


def print_table(checks: list[Check], file=sys.stdout) -> None:
    w_name = max(len(f"{c.section}/{c.name}") for c in checks)
    print(f"{'check':<{w_name}}  {'status':<6}  detail", file=file)
    print(f"{'-' * w_name}  ------  {'-' * 40}", file=file)
    for c in checks:
        lines = c.detail.splitlines() or [""]
        print(f"{c.section + '/' + c.name:<{w_name}}  {c.status:<6}  {lines[0]}", file=file)
        for ln in lines[1:]:
            print(f"{'':<{w_name}}  {'':<6}  {ln}", file=file)
