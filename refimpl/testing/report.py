"""The outcome of a conformance check: one row per property or comparison."""

from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("passed", "failed", "skipped", "note")


@dataclass
class Row:
    """One property or comparison.

    Attributes:
        name: what was checked ("output, eval, input (2, 16, 7, 5)", "AFF(X, X) = X").
        status: ``"passed"``, ``"failed"``, ``"skipped"`` (with the reason in ``detail``)
            or ``"note"`` (information, such as the variant a module matches).
        detail: the largest difference and where, or the reason.
    """

    name: str
    status: str
    detail: str = ""


@dataclass
class Report:
    """What :func:`~refimpl.testing.check_invariants` or :func:`~refimpl.testing.compare`
    found. ``str(report)`` is a readable table; :meth:`assert_ok` raises with it.

    Attributes:
        title: what was checked against what.
        rows: one per property or comparison.
        matches: names of the catalogue variants the module matches (``compare`` only,
            when the module differs from the requested form).
    """

    title: str
    rows: list[Row] = field(default_factory=list)
    matches: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no row failed (skipped rows do not fail a report)."""
        return not any(r.status == "failed" for r in self.rows)

    @property
    def failed(self) -> list[Row]:
        """The failed rows."""
        return [r for r in self.rows if r.status == "failed"]

    def add(self, name: str, status: str, detail: str = "") -> Row:
        """Append a row and return it."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        row = Row(name, status, detail)
        self.rows.append(row)
        return row

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [5])
        lines = [self.title, "=" * len(self.title)]
        for r in self.rows:
            mark = {"passed": "ok", "failed": "FAIL", "skipped": "skip", "note": "note"}[r.status]
            lines.append(f"{mark:>4}  {r.name:<{width}}  {r.detail}".rstrip())
        counts = {s: sum(r.status == s for r in self.rows) for s in STATUSES[:3]}
        verdict = (
            f"{'PASSED' if self.passed else 'FAILED'}: {counts['passed']} passed, "
            f"{counts['failed']} failed, {counts['skipped']} skipped"
        )
        if self.matches:
            verdict += f"; matches known variant(s): {', '.join(self.matches)}"
        elif any(r.name == "matches" for r in self.rows):
            verdict += "; matches no known variant"
        lines.append(verdict)
        return "\n".join(lines)

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` with the table if any row failed (for a user's pytest)."""
        if not self.passed:
            raise AssertionError("\n" + str(self))
