"""Preemption signals, cross-rank stop agreement, requeue with a loop guard, save watchdog."""
