"""The run level: a run of many items over one run folder (cv, sweep, the demo, run-level Models Genesis, the
adapt job array, summaries and ensembles), and the run folder's rules (stroke_tss.runs.folder).

It calls the fold level (stroke_tss.schedule and what it uses), never the reverse.
"""
