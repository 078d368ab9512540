"""The evaluation suite behind ``python -m benchmarks.run``.

One module per experiment family: ``accuracy`` (convergence of the real
``flwr run`` path), ``cost`` (seconds and bytes per round), ``scaling``
(growth with clients and parameters) and ``privacy_attacks`` (gradient
inversion and membership inference). ``profiles`` holds the smoke, quick and
full settings, ``machine`` the environment record, ``plots`` the figure
helpers and ``report`` the Markdown report.
"""
