"""bdclean: remove backdoors from instruction-tuned LLMs without knowing the trigger."""

__version__ = "0.1.0"
