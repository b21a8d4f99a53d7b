"""Running chapters and publishing the book: ``chapters`` (notebooks, parameters, the code a run is
keyed by), ``checks`` (each parameter's rule, checked before a kernel starts), ``runs`` (run keys, the
run graph, execution with papermill), ``schedule`` (books of several models, runs side by side),
``store`` (``arithlens runs``) and ``book`` (the Jupyter Book). The top of the house below ``cli``: it
may import every package.
"""
