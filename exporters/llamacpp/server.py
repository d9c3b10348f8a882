"""The pinned llama-server as a managed process: started on loopback (port chosen by the server, `--port 0`, read
from its "listening on" line) in its own process group, ready when /health answers, and always stopped with
its whole group. Requests go straight to 127.0.0.1, never through a proxy."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from exporters.llamacpp.build import tool_path
from exporters.llamacpp.run import ToolResult, die_with_parent, quoted_tail, stop_group, tool_failure, weight_flags
from mergeq.core import children, faults
from mergeq.core.errors import ToolError
from mergeq.core.memory import ChildPeak

SERVER = "llama-server"
START_TIMEOUT = 120.0  # seconds for llama-server to load the GGUF and answer /health
REQUEST_TIMEOUT = 30.0  # seconds per HTTP request
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL of the server's process group
SERVER_CONTEXT = 512  # tokens: the KV cache is never used, keep it small whatever the model's training context
_LISTENING = re.compile(r"listening on https?://127\.0\.0\.1:(\d+)")


class LlamaServer:
    """A running llama-server on loopback; `running_server` starts and always stops it."""

    def __init__(self, proc: subprocess.Popen, port: int, log_lines: list[str]):
        self.proc, self.port, self.log_lines = proc, port, log_lines
        self.peak_rss_bytes = 0  # set when it has stopped
        self.url = f"http://127.0.0.1:{port}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy

    @property
    def pid(self) -> int:
        return self.proc.pid

    def request(self, path: str, body: dict | None = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict]:
        """(HTTP status, JSON body) of GET (no body) or POST `path`."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            try:
                payload = json.loads(err.read() or b"{}")
            except ValueError:
                payload = {}
            return err.code, payload

    def output(self) -> ToolResult:
        """Its log so far (stdout and stderr together), as a tool's output."""
        return ToolResult("\n".join(self.log_lines), "", 0.0)


def server_command(gguf: Path, *, threads: int = 1) -> tuple[str, ...]:
    return (
        str(tool_path(SERVER)),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "-c",
        str(SERVER_CONTEXT),
        "-np",
        "1",
        "-t",
        str(threads),
        "--no-warmup",
        "--no-webui",
        "--jinja",
        *weight_flags(gguf)[0],
    )


@contextlib.contextmanager
def running_server(gguf: Path, *, timeout: float = START_TIMEOUT) -> Iterator[LlamaServer]:
    """llama-server on `gguf`, ready (its /health answers 200), stopped with its whole process group on exit.

    Raises ToolError when it exits or is not ready within `timeout` seconds, quoting its last log lines.
    """
    argv = faults.tool_argv(SERVER, server_command(gguf))  # inert unless MERGEQ_FAULT names llama-server
    children.clear_stale()
    started = time.perf_counter()
    try:
        # its own process group (stopped as a whole), and killed by Linux if mergeq dies first
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    except OSError as err:
        raise ToolError(f"{SERVER}: cannot run {argv[0]}: {err.strerror}") from err
    lines: list[str] = []
    port_found = threading.Event()
    ports: list[int] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not ports and (match := _LISTENING.search(line)):
                ports.append(int(match.group(1)))
                port_found.set()
        port_found.set()  # the server closed its output (it exited): stop waiting

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    entry = children.register(proc.pid, SERVER, argv)
    memory = ChildPeak(proc.pid)
    server = None
    try:
        server = _wait_ready(proc, lines, ports, port_found, started + timeout, timeout, gguf)
        yield server
    finally:
        stop_group(proc, STOP_TIMEOUT)
        children.unregister(entry)
        peak = memory.finish(0)
        if server is not None:
            server.peak_rss_bytes = peak
        reader.join(timeout=STOP_TIMEOUT)


def _wait_ready(proc, lines, ports, port_found, deadline, timeout, gguf) -> LlamaServer:
    def failure(what: str) -> ToolError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)  # it closed its output: let it finish exiting, to report how it ended
        output = LlamaServer(proc, 0, lines).output()
        code = proc.poll()
        if code is not None:
            return tool_failure(SERVER, code, output, hint=f"it could not serve {gguf}")
        return ToolError(f"{SERVER} {what}; its last output lines:\n{quoted_tail(output)}")

    port_found.wait(timeout=max(0.0, deadline - time.perf_counter()))
    if not ports:
        raise failure(f"did not report its address within {timeout:.0f} s")
    server = LlamaServer(proc, ports[0], lines)
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise failure("exited")
        with contextlib.suppress(OSError):  # refused or reset while it starts
            status, _ = server.request("/health", timeout=2.0)
            if status == 200:
                return server
        time.sleep(0.05)
    raise failure(f"did not answer /health within {timeout:.0f} s")
