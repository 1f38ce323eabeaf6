"""A store write whose answer never arrives: the store ran it, the connection broke before the
reply, the client asked again. Nothing accepted may be lost: a claimed task that no slot runs
goes back to the queue and runs."""
from __future__ import annotations

import hashlib
import logging
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

import pytest
from conftest import free_port

from flask_multiprocess_controller import MetaMPTask
from flask_multiprocess_controller.store.redis_scripts import CLAIM as _CLAIM


class Echo(MetaMPTask):
    def execute(self, n: int = 0) -> dict:
        return {"n": n}


class AnswerCutter:
    """A TCP proxy on 127.0.0.1 in front of a real server that, once armed, forwards the first
    request containing ``marker`` and then closes the client's connection instead of passing the
    reply on (the server has run the request; the client only sees the connection break)."""

    def __init__(self, upstream: tuple[str, int], marker: bytes) -> None:
        self.upstream = upstream
        self.marker = marker
        self.port = free_port()
        self.armed = threading.Event()
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._spawn(self._accept)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            pending = threading.Event()  # this connection's next reply is the one to drop
            self._spawn(self._requests, client, server, pending)
            self._spawn(self._replies, server, client, pending)

    def _requests(self, client: socket.socket, server: socket.socket, pending: threading.Event) -> None:
        while data := self._recv(client):
            if self.armed.is_set() and self.marker in data and not self.cut.is_set():
                pending.set()
            try:
                server.sendall(data)
            except OSError:
                return
        _shut(server)

    def _replies(self, server: socket.socket, client: socket.socket, pending: threading.Event) -> None:
        while data := self._recv(server):
            if pending.is_set():
                self.cut.set()
                _shut(client)
                _shut(server)
                return
            try:
                client.sendall(data)
            except OSError:
                return
        _shut(client)

    @staticmethod
    def _recv(sock: socket.socket) -> Optional[bytes]:
        try:
            return sock.recv(65536) or None
        except OSError:
            return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, threads = list(self._sockets), list(self._threads)
        _shut(self._listener)  # wakes the accepting thread
        self._listener.close()
        for sock in sockets:
            _shut(sock)
        for thread in threads:
            thread.join(5)
        for sock in sockets:
            sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


@pytest.fixture
def cutter(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.script_load(_CLAIM)  # so the claim that is cut runs (no NOSCRIPT answer to cut instead)
    client.close()
    url = urlparse(redis_url)
    proxy = AnswerCutter((url.hostname, url.port), hashlib.sha1(_CLAIM.encode()).hexdigest().encode())
    yield proxy
    proxy.close()


@pytest.mark.timeout(60)
def test_a_claim_whose_answer_was_lost_is_queued_again_and_runs(cutter, make_controller, caplog):
    # The proxy outlives the controller (fixtures end in reverse order), so its shutdown meets no outage.
    controller = make_controller(Echo, store=f"redis://127.0.0.1:{cutter.port}/0", max_num_process=1)
    controller.tasks()  # started: its slot waits for work
    cutter.armed.set()
    with caplog.at_level(logging.WARNING):
        uuid = controller.submit(n=7)
        task = controller.wait(uuid, timeout=30)
    assert cutter.cut.is_set(), "the claim's answer was not cut: the test did not test anything"
    assert task["status"] == "succeeded" and task["result"] == {"n": 7}, task
    assert task["attempt"] == 1, task  # the lost claim was taken back, not counted as a run
    assert "never started (the claim's answer was lost)" in caplog.text
