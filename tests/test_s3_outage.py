"""The S3 server stops while a run uploads a checkpoint: the run ends with one line naming
its storage (without credentials), and `wsss train` with the same name, once the server is
back, resumes from the last complete checkpoint.

moto's server keeps its buckets in memory, so it cannot be stopped and started again.
Instead the run reaches it through `CuttableProxy`, a TCP forwarder that "stops the
server": it closes its listening socket (new connections are refused) and resets every
open connection, in the middle of the request it was told to cut. It comes back on the
same port, with moto and the bucket as they were.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable

import pytest
from pyarrow import fs as pafs

from tests.helpers.s3 import BUCKET, run_wsss, wsss
from wsss.platform.checkpoints import latest_checkpoint, upload_checkpoint

SECRET = "outage-secret-key"
REQUEST_LINE = re.compile(rb"(GET|PUT|POST|HEAD|DELETE) (/\S*) HTTP/1\.[01]\r\n")


class CuttableProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, all connections in one thread
    (select over every socket), reading the request lines sent to the server.
    `cut_when(method, path)` is asked about each request; once it says yes, the proxy
    forwards `cut_after` more bytes of that request, then stops and records the request in
    `cut`: the request line, the bytes of its body that got through, when it was cut."""

    def __init__(self, target_port: int, cut_when: Callable[[str, str], bool], cut_after: int = 1 << 20):
        self.target_port, self.cut_when, self.cut_after = target_port, cut_when, cut_after
        self.port = 0
        self.cut: dict | None = None
        self._pairs: dict[socket.socket, socket.socket] = {}  # each end of a connection -> the other
        self._tails: dict[socket.socket, bytes] = {}  # client sockets -> their last bytes sent
        self._doomed: dict[socket.socket, list] = {}  # client socket -> [request, body bytes forwarded]
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CuttableProxy:
        """Listen (again: on the same port after a stop) and forward."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener, self._stopping = listener, threading.Event()
        self._thread = threading.Thread(target=self._serve, name="s3 proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Refuse new connections and reset the open ones."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _serve(self) -> None:
        try:
            while not self._stopping.is_set():
                readable, _, _ = select.select([self._listener, *self._pairs], [], [], 0.1)
                for sock in readable:
                    if self._stopping.is_set():
                        break
                    if sock is self._listener:
                        self._accept()
                    elif sock in self._pairs:
                        self._forward(sock)
        finally:
            self._listener.close()
            for sock in self._pairs:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
                sock.close()
            self._pairs.clear()
            self._tails.clear()
            self._doomed.clear()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        self._pairs[client], self._pairs[server] = server, client
        self._tails[client] = b""

    def _forward(self, sock: socket.socket) -> None:
        peer = self._pairs[sock]
        try:
            data = sock.recv(1 << 16)
            if data:
                peer.sendall(data)
        except OSError:
            data = b""
        if not data:  # one end closed: close the other
            for end in (sock, peer):
                for table in (self._pairs, self._tails, self._doomed):
                    table.pop(end, None)
                end.close()
        elif sock in self._tails:
            self._watch(sock, data)

    def _watch(self, client: socket.socket, data: bytes) -> None:
        """Find request lines in what the client sent (one may span two chunks); cut a
        doomed request once `cut_after` bytes of it went through."""
        tail = self._tails[client]
        if client in self._doomed:
            self._doomed[client][1] += len(data)
        for match in REQUEST_LINE.finditer(tail + data):
            if match.end() <= len(tail) or self.cut is not None or self._doomed:
                continue  # seen with the previous chunk, or a cut under way already
            if self.cut_when(match[1].decode(), match[2].decode(errors="replace")):
                self._doomed[client] = [f"{match[1].decode()} {match[2].decode()}", len(tail) + len(data) - match.end()]
        self._tails[client] = (tail + data)[-512:]
        if client in self._doomed and self._doomed[client][1] >= self.cut_after:
            request, forwarded = self._doomed[client]
            self.cut = {"request": request, "body_bytes_forwarded": forwarded, "at": time.monotonic()}
            self._stopping.set()  # the loop resets every connection before it forwards another byte


def moto_port(s3_env: dict) -> int:
    return int(s3_env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])


def read_json(filesystem: pafs.FileSystem, path: str) -> dict:
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read())


def test_a_checkpoint_upload_the_server_cuts_raises_and_leaves_no_checkpoint_json(s3_env, s3, tmp_path):
    local = tmp_path / "checkpoint"
    local.mkdir()
    (local / "state.pt").write_bytes(os.urandom(16 << 20))  # more than one part of a multipart upload
    (local / "checkpoint.json").write_text("{}")
    proxy = CuttableProxy(moto_port(s3_env), lambda method, path: method == "PUT" and "/state.pt" in path).start()
    try:
        through_proxy = pafs.S3FileSystem(endpoint_override=proxy.url, access_key="testing", secret_key="testing",
                                          region="us-east-1")
        with pytest.raises(OSError, match="state.pt"):
            upload_checkpoint(local, through_proxy, f"{BUCKET}/cut-upload/checkpoint_000001")
    finally:
        proxy.stop()
    assert proxy.cut and proxy.cut["request"].startswith(f"PUT /{BUCKET}/cut-upload/checkpoint_000001/state.pt")
    left = s3.get_file_info(pafs.FileSelector(f"{BUCKET}/cut-upload", recursive=True, allow_not_found=True))
    assert not [info.path for info in left if info.type == pafs.FileType.File]


@pytest.mark.slow
def test_s3_stopping_during_a_checkpoint_upload_fails_the_run_clearly_and_it_resumes(s3_env, s3, tmp_path):
    from wsss.datasets.prepare import prepare

    shards = tmp_path / "shards"  # local: only the run's storage goes through the proxy
    prepare("synthetic", tmp_path / "tree", shards, workers=1, preset="test", num_train=16, num_val=4)
    storage, run = f"s3://AKIAOUTAGE:{SECRET}@{BUCKET}/outage", f"{BUCKET}/outage/cut"
    uploads: list[str] = []  # checkpoint folders whose state.pt started uploading, in order

    def second_checkpoint_state(method: str, path: str) -> bool:
        """A part of the second checkpoint's state.pt: the first checkpoint is whole by
        then, as Ray Train uploads one checkpoint at a time."""
        part = re.match(rf"/{run}/(checkpoint_[^/]+)/state\.pt\?partNumber=", path)
        if method == "PUT" and part and part[1] not in uploads:
            uploads.append(part[1])
        return len(uploads) == 2

    proxy = CuttableProxy(moto_port(s3_env), second_checkpoint_state).start()
    through_proxy = s3_env | {"AWS_ENDPOINT_URL": proxy.url}
    train = ["train", "--method", "cam", "--data", str(shards), f"storage_path={storage}", "name=cut", "epochs=2",
             "batch_size=8", "crop_size=64", "backbone=resnet18", "backbone_weights=none", "val_split=",
             "wandb=offline", "--json"]
    try:
        try:
            failed = run_wsss(train, through_proxy, tmp_path)
        except subprocess.TimeoutExpired as hung:
            pytest.fail(f"the run never ended (cut: {proxy.cut}):\n"
                        f"{(hung.stderr or b'')[-6000:].decode(errors='replace')}")
        ended = time.monotonic()

        assert proxy.cut, f"the proxy never cut an upload; the run ended with {failed.returncode}:\n" \
                          f"{failed.stderr[-4000:]}"
        first, second = uploads
        assert proxy.cut["request"].startswith(f"PUT /{run}/{second}/state.pt?partNumber=")
        assert proxy.cut["body_bytes_forwarded"] >= proxy.cut_after  # cut inside the upload of a part
        assert failed.returncode == 1, failed.stderr[-6000:]
        (error,) = [line for line in failed.stderr.splitlines() if line.startswith("wsss train: error:")]
        assert not re.search(r"^Traceback", failed.stderr, re.MULTILINE), "the driver crashed"  # Ray's workers log theirs
        assert error.startswith(f"wsss train: error: s3://***@{run}: the storage does not answer ("), error
        assert error.endswith("the run stopped; once it answers, `wsss train` with the same name and storage_path "
                              "resumes from the last complete checkpoint"), error
        assert SECRET not in failed.stderr + failed.stdout
        assert ended - proxy.cut["at"] < 240, f"the run ended {ended - proxy.cut['at']:.0f} s after the cut"
        # What the outage left: the first checkpoint whole, nothing of the second.
        assert s3.get_file_info(f"{run}/{first}/state.pt").size > 0
        assert read_json(s3, f"{run}/{first}/checkpoint.json")["epoch"] == 1
        left = s3.get_file_info([f"{run}/{second}/state.pt", f"{run}/{second}/checkpoint.json"])
        assert [info.type for info in left] == [pafs.FileType.NotFound] * 2

        proxy.stop()
        proxy.start()  # the server is back, on the same port
        resumed = wsss(train, through_proxy, tmp_path)
    finally:
        proxy.stop()

    assert resumed["metrics"]["resumed_from_epoch"] == 1 and resumed["metrics"]["epoch"] == 2
    newest = resumed["checkpoint"].rsplit("/", 1)[1]
    assert resumed["checkpoint"] == f"s3://***@{run}/{newest}" and newest not in (first, second)
    assert read_json(s3, f"{run}/{newest}/checkpoint.json")["epoch"] == 2
    assert latest_checkpoint(f"s3://{run}") == f"s3://{run}/{newest}"
