"""Reporters show records and findings: console log lines, Lightning loggers, TensorBoard."""

from graddiag.reporters.base import Reporter, SafeReporter
from graddiag.reporters.console import ConsoleReporter

__all__ = ["ConsoleReporter", "Reporter", "SafeReporter"]
