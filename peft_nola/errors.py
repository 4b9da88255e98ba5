"""The library's own exception types, in one place that every module can import without importing another's code."""


class AdapterFileError(ValueError):
    """An adapter file that cannot be loaded as the adapter it claims to be. The message names the file, the field or
    tensor, and what to do."""


class ExportError(ValueError):
    """An adapter that cannot be exported exactly; the message says why and what to do instead."""
