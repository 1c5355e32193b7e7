"""sftui: a terminal supervisor for supervised fine-tuning runs."""

__version__ = "0.1.0"
