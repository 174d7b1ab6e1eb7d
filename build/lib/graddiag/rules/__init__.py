"""Floor 3, rules (numpy only): records in, findings out, with explanations and wording.

Importing this package loads no torch.
"""
