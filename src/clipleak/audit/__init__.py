"""The privacy audit: defended observations attacked across epsilons, beside the accuracy DP fine-tuning
keeps at the same epsilon, and a canary audit's empirical epsilon lower bound (:mod:`.cells`: the config
and cell keys; :mod:`.sweep`: the cells; :mod:`.summary`: table, intervals and verdicts; :mod:`.chart`:
chart and page; :mod:`.decoder`: the decoder ``--decoder auto`` trains and caches; :mod:`.canary`)."""

from .canary import canary_audit, epsilon_lower_bound
from .cells import AuditConfig, cell_keys, parse_epsilons
from .chart import chart_figure, write_chart, write_outputs
from .decoder import auto_decoder, decoder_path
from .summary import findings, markdown_table, summarise, verdict, verdicts
from .sweep import AuditContext, run_audit

__all__ = ["AuditConfig", "AuditContext", "auto_decoder", "canary_audit", "cell_keys", "chart_figure",
           "decoder_path", "epsilon_lower_bound", "findings", "markdown_table", "parse_epsilons", "run_audit",
           "summarise", "verdict", "verdicts", "write_chart", "write_outputs"]
