"""The far side of tests/test_nic_tcp.py: a NIC model in its own process
with one guarded region and one QP, listening on 127.0.0.1. Prints one JSON
line (port, link key, qpn, rkey, addr), then answers commands on stdin, one JSON
line each:
  {"cmd": "reset"}                   a fresh NIC, region and QP (the old NIC's
                                     links close); prints its JSON line
  {"cmd": "connect", "peer_qpn": N}  the QP to RTS, receiving from QP N
  {"cmd": "faults", ...}             NicModel.set_faults(...) (e.g. reorder)
  {"cmd": "read"}                    the whole buffer, guards included (hex)
  {"cmd": "watch", "data": N}        a thread checking, as fast as it can,
                                     that whenever the sequence word at byte
                                     offset N (zeroed first) is k, bytes
                                     [0, N) are all >= k
  {"cmd": "stale"}                   how often the watcher saw them < k
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np

from eaas_jax.transport.nic_model import NicModel

GUARD, SIZE, GUARD_BYTE = 256, 16384, 0xA5


class Side:
    """One NIC with its guarded buffer and QP."""

    def __init__(self):
        self.nic = NicModel()
        self.buf = np.full(SIZE + 2 * GUARD, GUARD_BYTE, np.uint8)
        self.mid = self.buf[GUARD : GUARD + SIZE]
        self.mid[:] = 0x11
        self.region = self.nic.register(self.mid)
        self.qp = self.nic.create_qp(6, 6)
        self.port, self.key = self.nic.listen()
        self.nic.start(interval_us=50)

    def info(self) -> dict:
        return {"port": self.port, "key": self.key, "qpn": self.qp.qpn, "rkey": self.region.rkey,
                "addr": self.region.addr}


def main() -> None:
    side = Side()
    print(json.dumps(side.info()), flush=True)
    stale = [0, 0]  # stale observations, observations
    stop = threading.Event()

    def watch(mid: np.ndarray, n: int) -> None:
        seq = mid[n : n + 8].view(np.uint64)
        while not stop.is_set():
            k = int(seq[0])
            if k and int(mid[:n].min()) < k:
                stale[0] += 1
            stale[1] += 1

    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "reset":
            stop.set()
            side.nic.close()
            side, stale, stop = Side(), [0, 0], threading.Event()
            out = side.info()
        elif msg["cmd"] == "connect":
            side.qp.connect_remote(msg["peer_qpn"])
            out = {}
        elif msg["cmd"] == "faults":
            side.nic.set_faults(**msg["faults"])
            out = {}
        elif msg["cmd"] == "read":
            out = {"buf": side.buf.tobytes().hex()}
        elif msg["cmd"] == "watch":
            side.mid[msg["data"] : msg["data"] + 8] = 0
            threading.Thread(target=watch, args=(side.mid, msg["data"]), daemon=True).start()
            out = {}
        elif msg["cmd"] == "stale":
            out = {"stale": stale[0], "seen": stale[1]}
        else:
            out = {"error": "unknown command"}
        print(json.dumps(out), flush=True)
    stop.set()
    side.nic.close()


if __name__ == "__main__":
    main()
