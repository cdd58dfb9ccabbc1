"""Reports: report.json, report.md and plots for original vs compressed."""
