"""A pseudo-terminal for a child process: what a user's terminal is when they type `selfhost ... > out.txt`.

`with Terminal(columns=100) as term:` gives `term.fd`, the terminal side to pass as the child's stdin
and/or stderr; what the child writes there is read in the background (so the child never blocks on a
full buffer) and is `term.text()` once the `with` ends.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
import threading


class Terminal:
    def __init__(self, columns: int = 100, rows: int = 24) -> None:
        self.controller, self.fd = pty.openpty()
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        self._seen: list[bytes] = []
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while True:
            try:
                chunk = os.read(self.controller, 1 << 16)
            except OSError:  # every terminal side is closed: the child is gone
                return
            if not chunk:
                return
            self._seen.append(chunk)

    def text(self) -> str:
        return b"".join(self._seen).decode("utf-8", "replace")

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *_: object) -> None:
        os.close(self.fd)
        self._reader.join(timeout=10)
        os.close(self.controller)
