"""Floor 1, plain data: records, findings, options, errors. Imports neither torch nor Lightning."""
