"""Reports for people and machines: one document model rendered as Markdown and self-contained HTML (document.py),
Pareto plots (pareto.py, imports matplotlib), the quickstart report (quickstart.py), and the flat JSON of figures
that `densa bench` / `densa study` write (flat.py). Import the module you need; this package imports nothing."""
