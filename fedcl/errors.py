"""User-facing errors: raised for bad input, printed by the CLI as one line without a traceback."""


class FedclError(Exception):
    """A problem with what the user asked for (config, dataset, strategy), not a bug in fedcl."""


class ConfigError(FedclError):
    """A config key or value that fedcl cannot use; the message names it and the valid choices."""


class DatasetError(FedclError):
    """A dataset that is unknown, missing on disk, or malformed; the message names which."""


class StrategyError(FedclError):
    """A strategy (or its hook) raised or returned the wrong type; names strategy, hook, round."""
