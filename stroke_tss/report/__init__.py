"""Run folders -> Table-2 style report, ROC/learning/reliability plots, model and reader statistics."""

from stroke_tss.report.collect import collect_logs, collect_predictions, phase_dirs, run_config
from stroke_tss.report.markdown import write_report
from stroke_tss.report.tables import delong_table, sensitivity_at_specificity_table, table2

__all__ = ["collect_logs", "collect_predictions", "delong_table", "phase_dirs", "run_config",
           "sensitivity_at_specificity_table", "table2", "write_report"]
