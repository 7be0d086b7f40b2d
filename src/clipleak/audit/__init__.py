"""The privacy audit: defended observations attacked across epsilons, beside the accuracy DP fine-tuning
keeps at the same epsilon, and a canary audit's empirical epsilon lower bound (:mod:`.sweep`, :mod:`.chart`,
:mod:`.canary`)."""

from .canary import canary_audit, epsilon_lower_bound
from .chart import markdown_table, summarise, write_chart, write_outputs
from .sweep import CHANCE_MARGIN, AuditConfig, cell_keys, parse_epsilons, run_audit

__all__ = ["CHANCE_MARGIN", "AuditConfig", "canary_audit", "cell_keys", "epsilon_lower_bound", "markdown_table",
           "parse_epsilons", "run_audit", "summarise", "write_chart", "write_outputs"]
