"""Errors raised at the library's boundaries (file readers, config parsing)."""


class UatmcError(Exception):
  """Base class of the errors this library raises on bad input."""


class DataFormatError(UatmcError, ValueError):
  """A data file is missing or malformed.

  The message always names the file (and line / array / field where relevant) and
  what was expected, so the user can fix the input without reading a traceback.
  """


class ConfigError(UatmcError, ValueError):
  """A configuration value is invalid; the message names the field."""
