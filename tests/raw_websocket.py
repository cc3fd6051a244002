"""A bare websocket client over a socket, for talking to a real Streamlit server the way an
attacker would: any Host and Origin header, and frames that are not what Streamlit expects."""

from __future__ import annotations

import base64
import os
import socket
import struct


class RawWebSocket:
    """One websocket connection to ``127.0.0.1:port`` with the given Host (and Origin) header."""

    def __init__(self, port: int, host: str, *, origin: str | None = None, path: str = "/_stcore/stream",
                 address: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((address, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
                 "Sec-WebSocket-Protocol: streamlit"]
        if origin is not None:
            lines.append(f"Origin: {origin}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            response += chunk
        head, _, self._pending = response.partition(b"\r\n\r\n")
        self.status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
        self.accepted = " 101 " in self.status_line + " "

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        """Send one masked frame (binary by default)."""
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 2**16:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read_exact(self, n: int) -> bytes:
        while len(self._pending) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            self._pending += chunk
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def receive(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame from the server (unmasked, not fragmented)."""
        first, second = self._read_exact(2)
        n = second & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8))[0]
        return first & 0x0F, self._read_exact(n)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
