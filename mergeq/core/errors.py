"""The one exception type that reaches the user as a clear message instead of a traceback."""


class MergeqError(Exception):
    """A problem the user can fix. The message names the file, tensor or option and says what to do.

    The CLI prints it without a traceback and exits with `exit_code`.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class ToolError(MergeqError):
    """An external tool (llama.cpp, a compiler) failed; the message carries its last stderr lines."""

    exit_code = 3
