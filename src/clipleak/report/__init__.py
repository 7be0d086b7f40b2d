"""The report: ``report.html``, ``metrics.json``, PNG grids and the loss curve."""

from .html import MIN_TILE, defense_text, loss_figure, save_loss, schedule_switches, write_report

__all__ = ["MIN_TILE", "defense_text", "loss_figure", "save_loss", "schedule_switches", "write_report"]
