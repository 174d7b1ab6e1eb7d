"""Floor 2, measurement (torch): layers, their order, fused norms, activation statistics, the host copy.

Imports the data floor only; knows nothing of rules or reporters.
"""
