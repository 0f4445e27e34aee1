"""The demo's Incus part: a real Incus server and a Stapes server, side by side in a network namespace of their
own; the official incus client and the stapes CLI move a container from Incus to Stapes and back. Everything
is removed on exit. Skipped, saying why, where Incus is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.incus_peer import incus_and_stapes, missing  # noqa: E402


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


PROGRESS = ("Transferring instance:", "Moving ", "Copying ", "Retrieving image:")


def show(result: subprocess.CompletedProcess[str], argv: list[str]) -> None:
    """The command and what it printed, without the progress lines a terminal would overwrite."""
    print("$ " + " ".join(argv), flush=True)
    lines = (result.stdout + result.stderr).replace("\r", "\n").splitlines()
    kept = [line for line in lines if line.strip() and not line.lstrip().startswith(PROGRESS)]
    if kept:
        print("\n".join(kept), flush=True)


def main() -> None:
    if reason := missing():
        say(f"Exchanging instances with Incus: skipped ({reason})")
        return
    say("Exchanging instances with a real Incus server (Debian's incus-base), both in a private network namespace")
    with incus_and_stapes("dir") as peers:
        incus, stapes, client, cli = peers.incus, peers.stapes, peers.client, peers.cli
        print(f"Incus {incus.local('version').stdout.split()[-1]} at {incus.url}, Stapes at {stapes.url}")

        def incus_cmd(*args: str) -> None:
            show(client.run(*args), ["incus", *args])

        def stapes_cmd(*args: str) -> None:
            show(cli.run(*args), ["stapes", *args])

        incus_cmd("launch", "inc:busybox", "inc:web", "-c", "user.owner=ops")
        incus_cmd("exec", "inc:web", "--", "sh", "-c", "echo made on incus > /root/note")
        incus_cmd("stop", "inc:web", "--force")
        incus_cmd("snapshot", "create", "inc:web", "before-move")
        say("incus move, Incus -> Stapes (the official client; pull, then push back)")
        incus_cmd("move", "inc:web", "st:web")
        incus_cmd("list", "st:", "-c", "nsS")
        incus_cmd("start", "st:web")
        incus_cmd("exec", "st:web", "--", "cat", "/root/note")
        incus_cmd("stop", "st:web", "--force")
        incus_cmd("move", "st:web", "inc:web", "--mode", "push")
        say("stapes move, with Incus as a remote (relay through this client, and back)")
        stapes_cmd("move", "inc:web", "st:web", "--mode", "relay")
        stapes_cmd("list", "st:")
        stapes_cmd("copy", "st:web", "inc:web-copy")
        incus_cmd("list", "inc:", "-c", "nsS")


if __name__ == "__main__":
    main()
