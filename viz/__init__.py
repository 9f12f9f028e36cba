"""mmspec's visualizer: traces (mmspec.trace.Generation) in, plotly figures and HTML out.

Nothing here loads a model or knows about Gradio; `app.py` wires these to the page.
- tokens:    tokens coloured by fate (accepted / correction / bonus / rejected), legend, diff
- tree_fig:  the draft tree of one step
- charts:    acceptance by depth, accepted-length histogram, session summary
- internals: per-layer attention entropy, visual-token compression maps
- race:      replay of vanilla + up to 3 measured runs on one slowed clock; race panes as HTML
- numbers:   measured medians and spreads as a table and one-line verdicts (from webui.measure.as_json)
- card:      a drafter's card as prose and tables, acceptance for any drafter, the target's world
- bench:     saved benchmark results with human labels and the hardware named
- traceio:   trace files with every raced run (export / offline replay)
"""
from viz.charts import acceptance_by_depth_figure, accepted_length_figure, summary_figure, summary_row, summary_table
from viz.internals import entropy_figure, visual_map_figure
from viz.style import CSS
from viz.tokens import diff_html, fates, legend_html, step_spans, tokens_html
from viz.traceio import Bundle
from viz.tree_fig import pick_step, tree_figure

__all__ = [
    "CSS", "Bundle", "acceptance_by_depth_figure", "accepted_length_figure", "diff_html", "entropy_figure", "fates",
    "legend_html", "pick_step", "step_spans", "summary_figure", "summary_row",
    "summary_table", "tokens_html", "tree_figure", "visual_map_figure",
]
