"""What ``starquant inspect`` shows: the two problems STaR-Quant exists for, measured on a model.

``measure`` holds the pure measurements (torch only), ``plots`` draws them with matplotlib
(the ``eval`` or ``dev`` extra), ``report`` writes the Markdown that embeds the figures. The
command (``cli/inspect_model.py``) loads and quantizes the models and calls the three.
"""
