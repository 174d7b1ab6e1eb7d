"""Floor 5, the framework-free pipeline: ``GradientMonitor`` and its bounded history."""
