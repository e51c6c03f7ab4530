"""Hub-side bad inputs: each ends in a SourceError that names the value and the fix, within a time bound.

Every case runs ``resolve`` in a fresh Python process with stdin closed (a prompt would end it), so a hang is
measured and killed instead of blocking the suite, and faults that must be set before huggingface_hub is imported
(``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) are set in its environment. Repos come from the session's local Hub; the
endpoints that never answer are sockets on 127.0.0.1 opened by this module.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOUND_S = 60.0  # the longest any case may take, Python start-up and imports included
TIMEOUT_S = 2  # HF_HUB_DOWNLOAD_TIMEOUT for the cases whose endpoint never answers
SERVER_LIFETIME_S = BOUND_S + 10  # a stalling server stops by itself after this long
_repos = itertools.count()


@contextlib.contextmanager
def stalling_server(reply: bytes | None) -> Iterator[str]:
    """An HTTP endpoint on 127.0.0.1 that accepts connections and never completes an answer; yields its URL.

    Args:
        reply: None: nothing ever accepts, reads or writes (the kernel completes the TCP handshake from the listen
            backlog). Bytes: each connection is accepted, gets ``reply`` (e.g. half of the headers) and then silence.
    """
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        deadline = time.monotonic() + SERVER_LIFETIME_S
        while not stop.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                held.append(conn)
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    if reply is not None:
        thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        if reply is not None:
            thread.join()
        for conn in held:
            conn.close()
        server.close()


def closed_port() -> str:
    """The URL of a 127.0.0.1 port nothing listens on (connections are refused)."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def run_python(code: str, *args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``code`` in a fresh interpreter (stdin closed, killed after BOUND_S); returns the result and seconds."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *args], env=full_env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=BOUND_S)
    return done, time.monotonic() - start


def resolve_error(ref: str, env: dict[str, str]) -> tuple[str, float]:
    """The SourceError message ``resolve(ref)`` ends with in a fresh process, and the seconds it took."""
    done, seconds = run_python("import sys; from deltakit.sources import resolve; resolve(sys.argv[1])", ref, env=env)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    prefix = "deltakit.refs.SourceError: "
    assert done.returncode == 1 and last.startswith(prefix), f"rc={done.returncode}\n{done.stderr[-3000:]}"
    return last[len(prefix):], seconds


# --- the cases ------------------------------------------------------------------------------------------------
# A setup gets (local_hub, exit_stack) and returns (reference, extra environment, substitutions for `expect`).
Setup = Callable[..., tuple[str, dict[str, str], dict[str, str]]]


@dataclass(frozen=True)
class Case:
    name: str
    setup: Setup
    expect: tuple[str, ...]  # fragments of the message; "{ref}" is the reference, other keys come from setup
    bound_s: float = BOUND_S


def _repo(hub, files: dict[str, bytes]) -> str:
    repo = f"hostile{next(_repos)}/model"
    hub.commit(repo, {"config.json": b'{"model_type": "bert"}', **files})
    return repo


def _wrong_revision(hub, stack) -> tuple[str, dict, dict]:
    return _repo(hub, {"model.safetensors": b"\x02\x00\x00\x00\x00\x00\x00\x00{}"}) + "@no-such-branch", {}, {}


def _stalled(reply: bytes | None, revision: str = "") -> Setup:
    def setup(hub, stack) -> tuple[str, dict, dict]:
        url = stack.enter_context(stalling_server(reply))
        return f"org/model{revision}", {"HF_ENDPOINT": url, "HF_HUB_DOWNLOAD_TIMEOUT": str(TIMEOUT_S)}, {"url": url}
    return setup


def _refused(hub, stack) -> tuple[str, dict, dict]:
    url = closed_port()
    return "org/model", {"HF_ENDPOINT": url}, {"url": url}


TIMED_OUT = ("the Hub at {url} did not answer within 2 s", "HF_ENDPOINT", "raise HF_HUB_DOWNLOAD_TIMEOUT",
             "set HF_HUB_OFFLINE=1")
CASES = [
    Case("wrong-repo-id", lambda hub, stack: (f"nobody{next(_repos)}/nothing", {}, {}),
         ("model repo '{ref}' not found", "check the id (org/name)")),
    Case("wrong-revision", _wrong_revision,
         ("revision 'no-such-branch' not found", "use a branch, a tag or a full commit")),
    *[Case(f"malformed-{i}", lambda hub, stack, ref=ref: (ref, {}, {}),
           ("'{ref}' is not a model reference", "Use 'org/name'"))
      for i, ref in enumerate(["org/a/b", "my org/model", "@main", "org/"])],
    Case("only-pickles", lambda hub, stack: (_repo(hub, {"pytorch_model.bin": b"pickle"}), {}, {}),
         ("'{ref}' has only pickled weights", "pass allow_pickle=True")),
    Case("no-weights", lambda hub, stack: (_repo(hub, {"README.md": b"# no weights"}), {}, {}),
         ("'{ref}' has no safetensors weights", "expected model.safetensors", "Point at a full checkpoint")),
    Case("stray-safetensors", lambda hub, stack: (_repo(hub, {"adapter_model.safetensors": b"x"}), {}, {}),
         ("'{ref}' has no usable safetensors", "['adapter_model.safetensors']", "rename it model.safetensors")),
    Case("offline-without-cache", lambda hub, stack: (_repo(hub, {}), {"HF_HUB_OFFLINE": "1"}, {}),
         ("'{ref}' is not in the local cache and HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")),
    Case("connection-refused", _refused, ("'{ref}' is not in the local cache and {url} is unreachable",
                                          "check the network and HF_ENDPOINT")),
    Case("never-answers", _stalled(None), TIMED_OUT, bound_s=30),
    Case("never-answers-pinned-commit", _stalled(None, "@" + "a" * 40), TIMED_OUT, bound_s=30),
    Case("slow-headers", _stalled(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"), TIMED_OUT, bound_s=30),
    Case("stalled-body", _stalled(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{"),
         TIMED_OUT, bound_s=30),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_hub_input_is_a_clear_source_error(case: Case, local_hub, hf_home):
    with contextlib.ExitStack() as stack:
        ref, env, names = case.setup(local_hub, stack)
        message, seconds = resolve_error(ref, env)
    for fragment in case.expect:
        assert fragment.format(ref=ref, **names) in message, message
    assert seconds < case.bound_s, f"{case.name} took {seconds:.1f} s"


@pytest.mark.parametrize(("code", "expect"), [
    ("from deltakit.hubsearch import find_finetunes; print(find_finetunes('org/model').note)",
     "could not be reached (SourceError: the Hub at {url} did not answer within 2 s"),
    ("from deltakit.families.minilm import MiniLMBaseConfig, _from_hub; print(_from_hub(MiniLMBaseConfig()))",
     "None"),
], ids=["fine-tune-search", "minilm-hub-probe"])
def test_other_hub_calls_give_up_on_a_silent_endpoint(code: str, expect: str, hf_home):
    """The search falls back to the embedded families, the MiniLM probe to the PyPI package: both within bounds."""
    with stalling_server(None) as url:
        done, seconds = run_python(code, env={"HF_ENDPOINT": url, "HF_HUB_DOWNLOAD_TIMEOUT": str(TIMEOUT_S),
                                              "HF_HUB_ETAG_TIMEOUT": str(TIMEOUT_S)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect.format(url=url) in done.stdout
    assert seconds < 30, f"took {seconds:.1f} s"


def test_a_download_stalled_mid_body_ends_at_its_first_timeout(monkeypatch):
    """File downloads stream; a body that stops arriving raises at once, where huggingface_hub would resume 5 times."""
    from huggingface_hub import get_session

    from deltakit.hubhttp import bound_hub_requests
    from deltakit.sources import SourceError

    bound_hub_requests()
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "1")
    start = time.monotonic()
    with stalling_server(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nsome bytes") as url:
        with pytest.raises(SourceError, match=r"did not answer within 1 s \(GET /org/model/resolve/main/x\)"):
            with get_session().stream("GET", f"{url}/org/model/resolve/main/x") as response:
                for _ in response.iter_bytes():
                    pass
    assert time.monotonic() - start < 10


def test_export_push_to_a_silent_hub_fails_in_bounds_and_keeps_the_export(tiny, tmp_path, hf_home):
    """`deltakit export --push-to-hub` against a Hub that never answers: one line naming the host, within bounds,
    and the exported folder stays whole on disk (nothing computed is lost)."""
    out = tmp_path / "pruned"
    code = ("import sys; from deltakit.cli import main; sys.exit(main(['export', 'family:tiny/base', "
            "'family:tiny/sentiment3', '--method', 'dare', '--rate', '0.9', '--out', sys.argv[1], "
            "'--push-to-hub', 'org/pruned']))")
    with stalling_server(None) as url:
        done, seconds = run_python(code, str(out), env={"HF_ENDPOINT": url, "HF_TOKEN": "hf_" + "Q" * 34,
                                                        "HF_HUB_DOWNLOAD_TIMEOUT": str(TIMEOUT_S),
                                                        "HF_HUB_ETAG_TIMEOUT": str(TIMEOUT_S)})
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("deltakit: error:") and "Traceback" not in done.stderr
    assert url.split("//")[1] in done.stderr and "Q" * 34 not in done.stdout + done.stderr
    assert f"wrote {out}" in done.stdout and (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert seconds < 45, f"took {seconds:.1f} s"
