"""Start or stop a throwaway PostgreSQL server on loopback (for the database tests and CI).

    python tools/pg_server.py start DIR     # prints the SQLAlchemy URL of the running server
    python tools/pg_server.py stop DIR

Uses the ``initdb`` / ``pg_ctl`` of a PostgreSQL install (on PATH or under
/usr/lib/postgresql/*/bin). PostgreSQL refuses to run as root, so as root the server runs as
the ``postgres`` user. Trust authentication, loopback only, a free port. Exits non-zero with
the reason when it cannot start one.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for cand in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return cand
    raise SystemExit(f"PostgreSQL's {name} not found (install PostgreSQL, e.g. apt-get install "
                     f"postgresql)")


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        raise SystemExit("running as root and no runuser to start PostgreSQL as 'postgres'")
    return [runuser, "-u", "postgres", "--"] + cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(root: Path) -> str:
    data = root / "data"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    if not data.exists():
        subprocess.run(_as_server_user([_bin("initdb"), "-D", str(data), "-U", "boundflow",
                                        "--auth=trust", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, text=True)
    port = _free_port()
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_server_user([_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l",
                                    str(root / "server.log"), "-w", "-t", "60", "start"]),
                   check=True, capture_output=True, text=True)
    (root / "port").write_text(str(port))
    return f"postgresql+psycopg://boundflow@127.0.0.1:{port}/postgres"


def stop(root: Path) -> None:
    subprocess.run(_as_server_user([_bin("pg_ctl"), "-D", str(root / "data"), "-m", "fast",
                                    "-w", "stop"]), check=False, capture_output=True)


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        raise SystemExit(__doc__)
    root = Path(sys.argv[2]).resolve()
    try:
        if sys.argv[1] == "start":
            print(start(root))
        else:
            stop(root)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"PostgreSQL {sys.argv[1]} failed: {(e.stderr or e.stdout or '').strip()}"
                         f"{'' if not (root / 'server.log').exists() else ' ' + (root / 'server.log').read_text()[-500:]}")


if __name__ == "__main__":
    main()
