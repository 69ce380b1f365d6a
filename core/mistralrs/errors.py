"""The mistralrs error hierarchy.

Frontends map these to exit codes (CLI) and HTTP statuses (server). Messages are one
line that names the problem and, where there is one, the fix.
"""

from __future__ import annotations


class MistralRsError(Exception):
    """Base class of every error mistralrs raises on purpose."""

    http_status = 500
    exit_code = 1


class PluginError(MistralRsError):
    """A plugin misbehaved in a way the host cannot paper over."""


class PluginConflictError(PluginError):
    """Two plugins registered the same name and neither declared it overrides the other."""


class NotFoundError(MistralRsError):
    """A named thing (architecture, backend, model, route) does not exist."""

    http_status = 404


class NoCandidateError(NotFoundError):
    """Selection found no registered candidate that supports the request (device, dtype, ...)."""


class ConfigError(MistralRsError):
    """A configuration value or file is invalid."""

    http_status = 400
    exit_code = 2


class InvalidRequest(MistralRsError):
    """A request is invalid; `param` names the offending field (OpenAI's `param`)."""

    http_status = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ModelLoadError(MistralRsError):
    """A model could not be found, fetched, parsed or loaded (missing file, bad JSON,
    unknown architecture, mis-shaped tensor, pickle-only repository, offline cache miss...)."""


class TemplateError(MistralRsError):
    """A chat template is missing, invalid, or raised while rendering."""

    http_status = 400
