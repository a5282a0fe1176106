"""Errors that the CLI reports as one line, without a traceback."""


class ObservatoryError(Exception):
    """A problem with the user's input (spec, store, selection) that the user can fix."""


class SpecError(ObservatoryError):
    """A run or analysis spec is malformed: unknown key, wrong type, impossible combination."""


class StoreError(ObservatoryError):
    """A store is missing, is not an observatory store, or has no such run, step or group."""


class AnalysisError(ObservatoryError):
    """An analysis cannot be loaded, or it failed or returned something other than it declared."""


class DataError(ObservatoryError):
    """A corpus or token file cannot be read: wrong format, encoding, field, dtype or ids."""
