"""HTML reports built from the derivatives on disk (so ``--reports-only`` can rebuild them)."""

from spineqprep.reports.group import build_group_report
from spineqprep.reports.html import Section
from spineqprep.reports.subject import build_subject_report

__all__ = ["Section", "build_group_report", "build_subject_report"]
