"""mbn: Memorized Batch Normalization (Guo et al., AAAI 2018) and friends, reproducible."""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake in the user's input (config, data, checkpoint). Entry points print the message
    without a traceback and exit with `exit_code` (mbn.cli lists the statuses)."""
    exit_code = 2


from mbn import naming  # noqa: E402,F401  (registers the ${mbn.run_id:} resolver)
