"""The remote shell rsync runs on the sending side: it joins rsync's stdin/stdout to a socket it inherited
from the daemon (one end of a socketpair), which the daemon forwards onto the migration websocket. Kept tiny:
it runs once per rsync transfer.

    python -m stapes.server.storage.netcat FD [ignored rsync arguments...]
"""

from __future__ import annotations

import os
import socket
import sys
import threading


def _pump_in(sock: socket.socket) -> None:
    while data := os.read(0, 1 << 16):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    threading.Thread(target=_pump_in, args=(sock,), daemon=True).start()
    while data := sock.recv(1 << 16):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]


if __name__ == "__main__":
    main()
